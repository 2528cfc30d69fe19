"""GGUF tensor names -> Hugging Face parameter names, plus the value fixes llama.cpp's
converter applied (Llama's Q/K row permutation, Gemma's norm offset)."""
from __future__ import annotations

import re

import torch

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
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

_BLK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def hf_name(arch: str, name: str) -> str | None:
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLK.match(name)
    if m is None:
        return None
    layer, part, kind = m.groups()
    if arch in ("gemma2", "gemma3") and part in _SANDWICH:
        target = _SANDWICH[part]
    else:
        target = _BLOCK.get(part)
    if target is None:
        return None
    return f"model.layers.{layer}.{target}.{kind}"


def unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's Q/K permutation (rotate-half -> interleaved)."""
    half = n_rows // n_head // 2
    idx = torch.arange(n_rows).reshape(n_head, half, 2).transpose(1, 2).reshape(-1)
    return idx


def needs_unpermute(arch: str, hf: str) -> str | None:
    """Which head count applies to a tensor that llama.cpp permuted (Llama only)."""
    if arch != "llama":
        return None
    if hf.endswith("self_attn.q_proj.weight") or hf.endswith("self_attn.q_proj.bias"):
        return "num_attention_heads"
    if hf.endswith("self_attn.k_proj.weight") or hf.endswith("self_attn.k_proj.bias"):
        return "num_key_value_heads"
    return None


def is_offset_norm(arch: str, hf: str) -> bool:
    """llama.cpp stores Gemma norm weights as (1 + w); the HF layers add the 1 themselves."""
    return arch in GEMMA_ARCHS and hf.endswith("norm.weight")
