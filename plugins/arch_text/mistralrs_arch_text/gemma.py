"""Gemma: Llama with (1 + w) norms, embeddings scaled by sqrt(hidden) and a tanh GELU."""
from __future__ import annotations

import math

from mistralrs_arch_text.llama import LlamaForCausalLM
from mistralrs_core.models.text_config import base_config


def gemma_activation(hf: dict) -> str:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    # Early Gemma configs say "gelu" but were trained with the tanh approximation.
    return "gelu_pytorch_tanh" if act == "gelu" else act


def gemma_fields(hf: dict) -> dict:
    """What every Gemma generation shares."""
    bias = bool(hf.get("attention_bias", False))
    return dict(norm_offset=1.0, embed_scale=math.sqrt(hf["hidden_size"]), hidden_act=gemma_activation(hf),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=bias, o_bias=bias)


class GemmaForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        return base_config(hf, **gemma_fields(hf))
