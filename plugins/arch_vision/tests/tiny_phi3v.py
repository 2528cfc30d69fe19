"""A tiny Phi-3-vision directory in Microsoft's layout, and the reference it is checked against.

transformers has no Phi-3-vision, so the reference is assembled here: transformers'
``CLIPVisionModel`` (the hub code wraps exactly that) and ``Phi3ForCausalLM`` (the hub's text
model is Phi-3), plus ``RefHDProjector``, the HD feature transform and projector written from
Microsoft's ``image_embedding_phi3_v.py`` (``hd_feature_transform``,
``reshape_hd_patches_2x2merge``, ``add_image_newline``). Every parameter is perturbed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mistralrs_core.testing.parity import perturb_parameters
from mistralrs_core.testing.tiny import write_tiny_tokenizer

NUM_CROPS = 4
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=336,
              patch_size=14, layer_norm_eps=1e-5, hidden_act="quick_gelu")
SPECIALS = ["<s>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>"]
# Phi-3-vision's hub template: content is a string (images are <|image_N|> tags in it).
TEMPLATE = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + "
            "'<|end|>\\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
            "{{- '<|assistant|>\\n' -}}{% endif %}")
PREPROCESSOR = {"image_processor_type": "Phi3VImageProcessor", "processor_class": "Phi3VProcessor",
                "num_crops": NUM_CROPS, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "do_convert_rgb": True}


class RefHDProjector(nn.Module):
    """image_embedding_phi3_v.py's separators, HD layout and MLP projection."""

    def __init__(self, dim: int, text_dim: int, order: str = "sub_glb"):
        super().__init__()
        self.order = order
        self.glb_GN = nn.Parameter(torch.zeros([1, 1, dim * 4]))
        self.sub_GN = nn.Parameter(torch.zeros([1, 1, 1, dim * 4]))
        self.img_projection = nn.Sequential(nn.Linear(dim * 4, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))

    @staticmethod
    def reshape_hd_patches_2x2merge(feats, h_crop, w_crop):
        n, length, c = feats.shape
        side = int(length ** 0.5)
        num_images = n // (h_crop * w_crop)
        return (feats.reshape(n, side, side, c)
                .reshape(n, side // 2, 2, side // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, -1, 4 * c)
                .reshape(num_images, h_crop, w_crop, side // 2, side // 2, -1).permute(0, 1, 3, 2, 4, 5)
                .reshape(num_images, h_crop * side // 2, w_crop * side // 2, 4 * c))

    def add_image_newline(self, hd):
        num_images, h, _, d = hd.shape
        return torch.cat([hd, self.sub_GN.expand(num_images, h, -1, -1)], dim=2).reshape(num_images, -1, d)

    def forward(self, image_features, image_sizes):
        """image_features [num_images, num_crops + 1, patches, C]; image_sizes [(h, w)] of the
        padded HD images -> the projected rows of all images, concatenated."""
        glb = self.add_image_newline(self.reshape_hd_patches_2x2merge(image_features[:, 0], 1, 1))
        rows = []
        for i, (h, w) in enumerate(image_sizes):
            h_crop, w_crop = h // 336, w // 336
            sub = self.reshape_hd_patches_2x2merge(image_features[i, 1:1 + h_crop * w_crop], h_crop, w_crop)
            sub = self.add_image_newline(sub).squeeze(0)
            parts = [sub, self.glb_GN.squeeze(0), glb[i]]
            rows += parts if self.order == "sub_glb" else parts[::-1]
        return self.img_projection(torch.cat(rows, dim=0))


class Reference(nn.Module):
    def __init__(self, clip, hd, lm, layer_idx=-2):
        super().__init__()
        self.clip, self.hd, self.lm, self.layer_idx = clip, hd, lm, layer_idx
        self._last = None

    @torch.inference_mode()
    def image_features(self, pixel_values, image_sizes):
        """The hub's Phi3ImageEmbedding on pixel values padded to num_crops + 1 crops."""
        num_images, num_crops = pixel_values.shape[:2]
        states = self.clip(pixel_values.flatten(0, 1), output_hidden_states=True).hidden_states[self.layer_idx]
        feats = states[:, 1:].reshape(num_images, num_crops, -1, states.shape[-1])
        return self.hd(feats, image_sizes)

    @torch.inference_mode()
    def logits(self, ids, feats=None, spans=()):
        """Logits [T, V] for ``ids`` with the feature rows ``feats`` put on ``spans``
        (start, length), in order. A call that extends the previous call's ids (same
        features) runs only the new tokens on the reference's own KV cache: a greedy
        reference then costs one prefill, not one per token."""
        last = self._last
        if (last is not None and last["feats"] is feats and last["spans"] == list(spans)
                and len(ids) > len(last["ids"]) and ids[:len(last["ids"])] == last["ids"]):
            h = self.lm.get_input_embeddings()(torch.tensor([ids[len(last["ids"]):]]))
            out = self.lm(inputs_embeds=h, cache=last["past"], use_cache=True)
            logits = torch.cat([last["logits"], out.logits[0].float()])
        else:
            h = self.lm.get_input_embeddings()(torch.tensor([ids]))
            k = 0
            for start, n in spans:
                h[0, start:start + n] = feats[k:k + n]
                k += n
            out = self.lm(inputs_embeds=h, use_cache=True)
            logits = out.logits[0].float()
        self._last = dict(ids=list(ids), feats=feats, spans=list(spans), past=out.cache, logits=logits)
        return logits


def write_tokenizer(out: Path) -> dict[str, int]:
    """The tiny byte-level tokenizer with Phi-3's markers, ``<|image|>`` and a BOS that every
    encode adds (as Phi-3-vision's Llama tokenizer does)."""
    from tokenizers import AddedToken, Tokenizer, processors
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|end|>", "unk_token": None, "pad_token": "<|endoftext|>",
        "add_bos_token": True, "add_eos_token": False, "chat_template": TEMPLATE}))
    return {t: tok.token_to_id(t) for t in SPECIALS}


def text_config(vocab: int, *, original_max=2048, rope="su") -> dict:
    """Phi-3-vision's config.json text keys (LongRoPE factors per rotary frequency)."""
    head_dim = 16
    return {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu",
            "max_position_embeddings": 4 * original_max, "original_max_position_embeddings": original_max,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False,
            "rope_scaling": {"type": rope, "short_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
                             "long_factor": [1.5 + 0.7 * i for i in range(head_dim // 2)]},
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def make_reference(text: dict, *, order="sub_glb", layer_idx=-2, seed=1) -> Reference:
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM
    tc = dict(text)
    tc["rope_scaling"] = {**tc["rope_scaling"], "type": "longrope"}
    lm_cfg = Phi3Config(**tc)
    lm_cfg._attn_implementation = "eager"
    vc = CLIPVisionConfig(**VISION)
    vc._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Reference(CLIPVisionModel(vc), RefHDProjector(VISION["hidden_size"], text["hidden_size"], order),
                    Phi3ForCausalLM(lm_cfg), layer_idx).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    return ref


def save_microsoft_layout(ref: Reference, out: Path) -> None:
    """Weights under the names Microsoft's checkpoints use (everything below ``model.``)."""
    from safetensors.torch import save_file
    w = {k: v for k, v in ref.lm.state_dict().items()}
    # transformers 5's CLIPVisionModel state dict has no ``vision_model.`` level; the hub's has.
    w.update({"model.vision_embed_tokens.img_processor.vision_model." + k.removeprefix("vision_model."): v
              for k, v in ref.clip.state_dict().items()})
    w.update({"model.vision_embed_tokens." + k: v for k, v in ref.hd.state_dict().items()})
    save_file({k: v.contiguous() for k, v in w.items()}, str(out / "model.safetensors"))


def write_tiny_phi3v(out: Path, *, order="sub_glb", layer_idx=-2, original_max=2048, rope="su", seed=1):
    """Returns (model dir, Reference, special token ids)."""
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(out)
    text = text_config(max(ids.values()) + 1, original_max=original_max, rope=rope)
    ref = make_reference(text, order=order, layer_idx=layer_idx, seed=seed)
    save_microsoft_layout(ref, out)
    cfg = {"architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v", "torch_dtype": "float32",
           **text,
           "embd_layer": {"embedding_cls": "image", "hd_transform_order": order, "projection_cls": "mlp",
                          "use_hd_transform": True, "with_learnable_separator": True},
           "img_processor": {"image_dim_out": VISION["hidden_size"], "model_name": "openai/clip-vit-large-patch14-336",
                             "name": "clip_vision_model", "num_img_tokens": 144, "layer_idx": layer_idx,
                             "type_feature": "patch"},
           # Not in the hub's config (its code fixes CLIP ViT-L/14-336): the tiny tower's size.
           "vision_config": VISION}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return out, ref, ids
