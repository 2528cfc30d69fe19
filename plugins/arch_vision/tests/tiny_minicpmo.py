"""A tiny MiniCPM-o 2.6 directory in openbmb's layout, and the reference model it was saved from.

There is no transformers MiniCPM-o. The reference is transformers' ``Qwen2ForCausalLM`` (the
``llm``) and ``Idefics2VisionTransformer`` (the ``vpm``: the hub's SigLIP has its weight names
and layers) plus a resampler written here from the hub's ``resampler.py`` (torch's
``nn.MultiheadAttention``, numpy sin/cos positions built the hub's way). Two pieces of the
reference are ours, written from the hub's published code: the resampler below, and the
vision position ids (``hub_position_ids_ref``: the hub's ``arange`` fractions, which
transformers' Idefics2 embeddings compute differently), fed to the transformers tower's own
patch embedding, position table, encoder and post-layernorm.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.testing.parity import perturb_parameters
from mistralrs_core.testing.tiny import write_tiny_tokenizer

PATCH = 2
IMAGE = 16              # the vision position table: 8 x 8 cells
QUERIES = 4             # query_num / image_feature_size: tokens per slice
TEXT_HIDDEN = 256       # the hub gives the resampler hidden // 128 heads: 2 here
MARKERS = ("<image>", "</image>", "<slice>", "</slice>", "<unk>", "<image_id>", "</image_id>")

# MiniCPM-o's template: ChatML over string contents (the hub's chat flattens parts first).
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
            "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
            "{% endif %}")

# openbmb/MiniCPM-o-2_6's preprocessor_config.json at the tiny size (slices of about 12x12 pixels).
PREPROCESSOR = {"image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMOProcessor",
                "max_slice_nums": 9, "scale_resolution": 12, "patch_size": PATCH, "use_image_id": True,
                "image_feature_size": QUERIES, "im_start": "<image>", "im_end": "</image>",
                "slice_start": "<slice>", "slice_end": "</slice>", "unk": "<unk>", "im_id_start": "<image_id>",
                "im_id_end": "</image_id>", "slice_mode": True, "norm_mean": [0.5, 0.5, 0.5],
                "norm_std": [0.5, 0.5, 0.5], "version": 2.6}


def write_tokenizer(out: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer
    write_tiny_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MARKERS])
    tok.save(str(out / "tokenizer.json"))
    return {t: tok.token_to_id(t) for t in MARKERS}


# --------------------------------------------------------------------------- reference pieces
def sincos_2d_ref(embed_dim: int, h: int, w: int) -> np.ndarray:
    """The hub's get_2d_sincos_pos_embed: a (w, h) meshgrid, grid[0] (columns) embedded first."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32)), axis=0)

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=-1)


class RefResampler(nn.Module):
    """The hub's resampler.py (2.6): LayerNorm'd queries attend over kv_proj'd, LayerNorm'd
    patches with sin/cos positions on the keys; ln_post; @ proj."""

    def __init__(self, num_queries, embed_dim, num_heads, kv_dim):
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(embed_dim, eps=1e-6) for _ in range(3))
        self.proj = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))

    def forward(self, x, tgt_sizes):
        bs = x.shape[0]
        patch_len = [h * w for h, w in tgt_sizes]
        mask = torch.zeros(bs, max(patch_len), dtype=torch.bool)
        pos = []
        for i, (h, w) in enumerate(tgt_sizes):
            pos.append(torch.from_numpy(sincos_2d_ref(self.embed_dim, h, w)).float().reshape(h * w, -1))
            mask[i, patch_len[i]:] = True
        pos = nn.utils.rnn.pad_sequence(pos, batch_first=True).permute(1, 0, 2)
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, bs, 1), x + pos, x, key_padding_mask=mask)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


def hub_position_ids_ref(nb_h, nb_w, per_side):
    """modeling_navit_siglip.py's position ids of one slice (tgt_sizes given)."""
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)
    nb_h, nb_w = torch.tensor(nb_h, dtype=torch.int32), torch.tensor(nb_w, dtype=torch.int32)
    fh = torch.arange(0, 1 - 1e-6, 1 / nb_h)
    fw = torch.arange(0, 1 - 1e-6, 1 / nb_w)
    bh, bw = torch.bucketize(fh, boundaries, right=True), torch.bucketize(fw, boundaries, right=True)
    return (bh[:, None] * per_side + bw).flatten()


class RefMiniCPMO(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        from transformers import Idefics2VisionConfig, Qwen2Config, Qwen2ForCausalLM
        from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer
        self.text_config = dict(vocab_size=vocab, hidden_size=TEXT_HIDDEN, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
                                tie_word_embeddings=False, use_sliding_window=False, hidden_act="silu")
        tc = Qwen2Config(**self.text_config, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        self.vision_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=IMAGE, patch_size=PATCH, layer_norm_eps=1e-6,
                                  hidden_act="gelu_pytorch_tanh")
        vc = Idefics2VisionConfig(**self.vision_config)
        for c in (tc, vc):
            c._attn_implementation = "eager"
        self.llm = Qwen2ForCausalLM(tc)
        self.vpm = Idefics2VisionTransformer(vc)
        self.resampler = RefResampler(QUERIES, TEXT_HIDDEN, TEXT_HIDDEN // 128, vc.hidden_size)

    def config_json(self) -> dict:
        return {**self.text_config, "architectures": ["MiniCPMO"], "model_type": "minicpmo", "version": 2.6,
                "query_num": QUERIES, "batch_vision_input": True, "vision_batch_size": 16,
                "drop_vision_last_layer": False, "init_vision": True, "init_audio": True, "init_tts": True,
                "vision_config": {**self.vision_config, "model_type": "siglip_vision_model"},
                "audio_config": {"model_type": "whisper", "d_model": 8}, "torch_dtype": "float32"}

    @torch.inference_mode()
    def slice_features(self, pieces) -> list[torch.Tensor]:
        """Slices in the processor's [C, P, n * P] layout with tgt (h, w) -> [QUERIES, hidden]
        each: every slice through the tower alone (folded back into an image), then the
        resampler over all of them as one padded batch."""
        emb, feats = self.vpm.embeddings, []
        for pixels, (h, w) in pieces:
            n = h * w
            cols = pixels.reshape(3, PATCH, n, PATCH).permute(0, 1, 3, 2).reshape(3 * PATCH * PATCH, n)
            image = F.fold(cols[None], (h * PATCH, w * PATCH), PATCH, stride=PATCH)
            x = emb.patch_embedding(image).flatten(2).transpose(1, 2)
            x = x + emb.position_embedding(hub_position_ids_ref(h, w, IMAGE // PATCH))
            x = self.vpm.encoder(inputs_embeds=x).last_hidden_state
            feats.append(self.vpm.post_layernorm(x)[0])
        padded = nn.utils.rnn.pad_sequence(feats, batch_first=True)
        return list(self.resampler(padded, [tgt for _, tgt in pieces]))

    @torch.inference_mode()
    def logits(self, ids, feats=(), spans=()):
        """The hub's get_vllm_embedding + llm: features written over the spans' rows."""
        h = self.llm.get_input_embeddings()(torch.tensor([ids]))
        for (start, n), f in zip(spans, feats):
            h[0, start:start + n] = f
        return self.llm(inputs_embeds=h).logits[0].float()


def write_tiny_minicpmo(out: Path, seed: int = 1):
    from safetensors.torch import save_file
    ids = write_tokenizer(out)
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    ref = RefMiniCPMO(vocab).float().eval()
    # The 256-wide parts (the hub's resampler needs hidden // 128 heads) get half the 0.3 noise
    # of the 32/64-wide ones: each random matmul then grows activations as much as in the other
    # families' tiny models (0.3 * sqrt(64)), not twice as much per layer, which left the text
    # model amplifying float32 rounding of the image features tenfold.
    perturb_parameters(ref.vpm, seed=seed, scale=0.3)
    perturb_parameters(ref.resampler, seed=seed + 1, scale=0.15)
    perturb_parameters(ref.llm, seed=seed + 2, scale=0.15)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    # MiniCPM-o's audio encoder and TTS weights ride along in the checkpoint; images only here.
    g = torch.Generator().manual_seed(5)
    state["apm.layers.0.fc1.weight"] = torch.randn(8, 8, generator=g)
    state["tts.emb_code.0.weight"] = torch.randn(4, 8, generator=g)
    state["audio_projection_layer.linear1.weight"] = torch.randn(8, 8, generator=g)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(ref.config_json()))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return out, ref, ids
