"""Qwen3: Qwen2 without the forced q/k/v biases, with a per-head RMSNorm on q and k."""
from __future__ import annotations

from mistralrs_arch_text.qwen2 import Qwen2ForCausalLM, qwen_sliding
from mistralrs_core.models.text_config import base_config


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        bias = bool(hf.get("attention_bias", False))
        return base_config(hf, qkv_bias=bias, o_bias=bias, qk_norm=True, **qwen_sliding(hf))
