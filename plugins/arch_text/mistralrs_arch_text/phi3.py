"""Phi-3: Llama with fused ``qkv_proj`` / ``gate_up_proj``, LongRoPE scaling and a sliding
window over every layer."""
from __future__ import annotations

from mistralrs_arch_text.llama import LlamaForCausalLM
from mistralrs_core.models.text_config import base_config


class Phi3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        return base_config(hf, qkv_fused=True, mlp_fused=True, sliding_window=hf.get("sliding_window"))
