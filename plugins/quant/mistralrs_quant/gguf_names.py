"""GGUF tensor names -> Hugging Face parameter names, plus the value fixes llama.cpp's
converter applied (Llama's Q/K row permutation, Gemma's norm offset, Phi-2's fused q/k/v).

One GGUF tensor may feed several HF parameters (a fused ``attn_qkv`` whose family keeps
separate projections) or none (rope tables, which ``gguf_config`` turns into rope
settings), so a lookup returns a list of ``Target``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GLOBAL_BY_ARCH = {
    "phi2": {"output_norm": "model.final_layernorm"},
}

_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}

# Gemma 2/3 have four norms per block; llama.cpp names them differently from Llama.
_SANDWICH = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# Where a family's module names differ from Llama's.
_BLOCK_BY_ARCH = {
    "phi2": {"attn_output": "self_attn.dense", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
    # Phi-3 keeps q/k/v and gate/up fused in both formats: the rows line up one to one.
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "starcoder2": {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    "gemma2": _SANDWICH,
    "gemma3": _SANDWICH,
}

# Families whose GGUF fuses q/k/v (rows q, then k, then v) while the family has three
# projections: Phi-2 GGUFs converted from Microsoft's original ``mixer.Wqkv`` checkpoint.
_SPLIT_QKV = {"phi2"}

# Tensors that hold rope settings, read by gguf_config; per-block rotary tables are
# precomputed sin/cos that we compute ourselves.
CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")

# llama.cpp's "normal" rope (pairs of adjacent values) among our families: its converter
# permuted these families' q/k rows from the HF rotate-half layout.
ROPE_PERMUTED_ARCHS = ("llama", "smollm3")
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")

_BLK = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
_TOP = re.compile(r"^([a-z_]+)\.(weight|bias)$")


@dataclass(frozen=True)
class Target:
    name: str                              # HF parameter name
    rows: tuple[int, int] | None = None    # the GGUF tensor's row range feeding it


def hf_targets(arch: str, name: str, hf_cfg: dict) -> list[Target] | None:
    """The HF parameters a GGUF tensor feeds; [] for tensors read as settings, None if the
    family has no counterpart."""
    if name in CONFIG_TENSORS:
        return []
    m = _BLK.match(name)
    if m is None:
        top = _TOP.match(name)
        if top is None:
            return None
        base = {**_GLOBAL, **_GLOBAL_BY_ARCH.get(arch, {})}.get(top[1])
        return None if base is None else [Target(f"{base}.{top[2]}")]
    layer, part, kind = m.groups()
    if part == "attn_rot_embd":
        return []
    prefix = f"model.layers.{layer}."
    if part == "attn_qkv" and arch in _SPLIT_QKV:
        q, kv = _qkv_rows(hf_cfg)
        return [Target(f"{prefix}self_attn.{p}_proj.{kind}", rows)
                for p, rows in (("q", (0, q)), ("k", (q, q + kv)), ("v", (q + kv, q + 2 * kv)))]
    target = _BLOCK_BY_ARCH.get(arch, {}).get(part) or _BLOCK.get(part)
    if target is None:
        return None
    return [Target(f"{prefix}{target}.{kind}")]


def _qkv_rows(hf_cfg: dict) -> tuple[int, int]:
    heads = hf_cfg["num_attention_heads"]
    head_dim = hf_cfg.get("head_dim") or hf_cfg["hidden_size"] // heads
    return heads * head_dim, hf_cfg.get("num_key_value_heads", heads) * head_dim


def unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's Q/K permutation (rotate-half -> interleaved)."""
    if n_head <= 0 or n_rows % (2 * n_head):
        # The head count comes from the metadata, the rows from the tensor: a damaged file.
        raise ValueError(f"{n_rows} rows cannot be split into {n_head} rotary heads; the head count "
                         f"metadata does not match the tensor")
    half = n_rows // n_head // 2
    idx = torch.arange(n_rows).reshape(n_head, half, 2).transpose(1, 2).reshape(-1)
    return idx


def needs_unpermute(arch: str, hf: str) -> str | None:
    """Which head count applies to a tensor that llama.cpp permuted."""
    if arch not in ROPE_PERMUTED_ARCHS:
        return None
    if hf.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return "num_attention_heads"
    if hf.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return "num_key_value_heads"
    return None


def is_offset_norm(arch: str, hf: str) -> bool:
    """llama.cpp stores Gemma norm weights as (1 + w); the HF layers add the 1 themselves."""
    return arch in GEMMA_ARCHS and hf.endswith("norm.weight")
