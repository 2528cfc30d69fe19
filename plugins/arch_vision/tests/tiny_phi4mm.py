"""A tiny Phi-4-multimodal directory (transformers' ``Phi4MultimodalForCausalLM``, every
parameter perturbed) for tests, in transformers 5's layout; ``write_microsoft_layout`` rewrites
it into Microsoft's original one (``glb_GN``/``sub_GN``, ``img_projection.0/2``, vision and
speech LoRA weights beside each ``base_layer``)."""
from __future__ import annotations

import json
import types
from pathlib import Path

import torch

from mistralrs_core.testing.parity import perturb_parameters, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer

from tiny_phi4mm_audio import TINY_AUDIO, original_config, to_original_name

IMAGE_TOKEN, AUDIO_TOKEN = "<|endoftext10|>", "<|endoftext11|>"
MARKERS = ("<|user|>", "<|assistant|>", "<|end|>", "<|system|>")
ROTARY = 12                      # head_dim 16 * partial_rotary_factor 0.75

# The hub's (Microsoft's) chat template: string content only; images and audio are placed by
# the <|image_N|> / <|audio_N|> tags the user writes in the text.
TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")

# Microsoft's preprocessor_config.json, at half the released crop size (448) to keep the tests
# fast: 16 x 16 patches a crop, 8 x 8 after pooling.
CROP = 224
PREPROCESSOR = {"dynamic_hd": 36, "size": {"height": CROP, "width": CROP}, "patch_size": 14, "image_processor_type": "Phi4MMImageProcessor",
                "feature_extractor_type": "Phi4MMAudioFeatureExtractor", "audio_compression_rate": 8,
                "audio_downsample_rate": 1, "audio_feat_stride": 1, "processor_class": "Phi4MMProcessor"}


def write_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    names = (IMAGE_TOKEN, AUDIO_TOKEN, *MARKERS)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in names])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in names}


def make_reference(vocab: int, ids: dict[str, int], *, seed: int = 1, vision_layers: int = 3):
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(ROTARY // 2)],
            "long_factor": [2.0 + 0.3 * i for i in range(ROTARY // 2)],
            "original_max_position_embeddings": 2048}
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
              image_size=CROP, patch_size=14, crop_size=CROP, feature_layer=-2, image_token_id=ids[IMAGE_TOKEN])
    ac = dict(TINY_AUDIO, audio_token_id=ids[AUDIO_TOKEN])
    cfg = Phi4MultimodalConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                               original_max_position_embeddings=2048, rope_parameters=rope, rms_norm_eps=1e-5,
                               tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                               vision_config=vc, audio_config=ac)
    # Eager everywhere: transformers' vision attention sets ``is_causal = True``, which its SDPA
    # path honours when a crop has no padding mask (a causal image tower, not the model's math).
    for c in (cfg, cfg.vision_config, cfg.audio_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = Phi4MultimodalForCausalLM(cfg).float().eval()
    perturb_parameters(ref, seed=seed, scale=0.3)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():   # the audio encoder's mean / inverse-std buffers (zeros / ones at init)
        for _, buf in ref.model.embed_tokens_extend.audio_embed.named_buffers():
            buf.add_(torch.randn(buf.shape, generator=g) * 0.1)
    return ref


def write_tiny_phi4mm(out: Path, **kw):
    ids = write_tokenizer(out)
    vocab = max(ids.values()) + 1
    ref = make_reference(vocab, ids, **kw)
    save_reference(ref, out, extra_files={"preprocessor_config.json": PREPROCESSOR,
                                          "chat_template.json": {"chat_template": TEMPLATE}})
    return out, ref, ids


# Microsoft's LoRA settings (Phi-4-multimodal-instruct's config.json), at a tiny rank.
VISION_LORA = {"dp": 0.0, "layer": "layers.*((self_attn\\.(qkv_proj|o_proj))|(mlp\\.(gate_up|down)_proj))",
               "lora_alpha": 8, "r": 4}
SPEECH_LORA = {"dp": 0.01, "layer": "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))",
               "lora_alpha": 10, "r": 5}
_MS_RENAMES = (
    ("model.embed_tokens_extend.image_embed.global_img_feature_extensor", "model.embed_tokens_extend.image_embed.glb_GN"),
    ("model.embed_tokens_extend.image_embed.sub_img_feature_extensor", "model.embed_tokens_extend.image_embed.sub_GN"),
    ("model.embed_tokens_extend.image_embed.img_projection_up.", "model.embed_tokens_extend.image_embed.img_projection.0."),
    ("model.embed_tokens_extend.image_embed.img_projection_down.", "model.embed_tokens_extend.image_embed.img_projection.2."),
)
AUDIO_PREFIX = "model.embed_tokens_extend.audio_embed."
_LORA_TARGETS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def microsoft_config(hf: dict) -> dict:
    """transformers 5's config.json -> Microsoft's keys for the same model. The tower's size and
    the image placeholder id, which Microsoft's config never states, stay in ``vision_config``
    (our loader reads it when present; the hub model needs the defaults); the audio encoder is
    described by ``audio_processor`` only, and its placeholder id comes from the tokenizer."""
    rope = dict(hf["rope_parameters"])
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "sliding_window", "vision_config")
    out = {k: hf[k] for k in keep}
    audio = original_config(types.SimpleNamespace(hidden_size=hf["hidden_size"],
                                                  audio_config=types.SimpleNamespace(**hf["audio_config"])))
    out.update(audio_processor=audio["audio_processor"])
    out.update(model_type="phi4mm", architectures=["Phi4MMForCausalLM"], resid_pdrop=0.0, embd_pdrop=0.0,
               attention_dropout=0.0, rope_theta=rope["rope_theta"],
               partial_rotary_factor=rope["partial_rotary_factor"],
               original_max_position_embeddings=rope["original_max_position_embeddings"],
               rope_scaling={"type": "longrope", "short_factor": rope["short_factor"],
                             "long_factor": rope["long_factor"]},
               embd_layer={"embedding_cls": "image_audio",
                           "image_embd_layer": {"crop_size": hf["vision_config"]["crop_size"], "embedding_cls": "tune_image",
                                                "hd_transform_order": "sub_glb",
                                                "image_token_compression_cls": "avg_pool_2d",
                                                "projection_cls": "mlp", "use_hd_transform": True,
                                                "with_learnable_separator": True},
                           "audio_embd_layer": audio["embd_layer"]["audio_embd_layer"]},
               img_processor=None, vision_lora=VISION_LORA, speech_lora=SPEECH_LORA)
    return out


def write_microsoft_layout(src: Path, out: Path, seed: int = 7) -> dict[str, torch.Tensor]:
    """Rewrite the transformers-5 folder ``src`` into Microsoft's layout in ``out``: renamed
    tensors, and each text linear as ``base_layer`` (the original weight) plus random vision and
    speech LoRA pairs. Returns the weights upstream's rule gives (base + vision LoRA merged), by
    transformers-5 name, to load into the reference."""
    import shutil
    from safetensors.torch import load_file, save_file
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    hf = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(microsoft_config(hf)))
    g = torch.Generator().manual_seed(seed)
    tensors, merged = {}, {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        prefix = name[:-len(".weight")]
        if name.startswith("model.layers.") and prefix.endswith(_LORA_TARGETS):
            tensors[f"{prefix}.base_layer.weight"] = w
            for lora, spec in (("vision", VISION_LORA), ("speech", SPEECH_LORA)):
                a = torch.randn(spec["r"], w.shape[1], generator=g) * 0.2
                b = torch.randn(w.shape[0], spec["r"], generator=g) * 0.2
                tensors[f"{prefix}.lora_A.{lora}.weight"] = a
                tensors[f"{prefix}.lora_B.{lora}.weight"] = b
                if lora == "vision":
                    scale = spec["lora_alpha"] / spec["r"]
                    merged[name] = w + (b @ a) * scale
            continue
        for a, b in _MS_RENAMES:
            if name.startswith(a):
                name = b + name[len(a):]
                break
        if name.startswith(AUDIO_PREFIX):
            name = AUDIO_PREFIX + to_original_name(name[len(AUDIO_PREFIX):])
        tensors[name] = w
    save_file(tensors, str(out / "model.safetensors"))
    return merged
