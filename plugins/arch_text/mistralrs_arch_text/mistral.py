"""Mistral: Llama with an optional sliding attention window."""
from __future__ import annotations

from mistralrs_arch_text.llama import LlamaForCausalLM
from mistralrs_core.models.text_config import base_config


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        return base_config(hf, sliding_window=hf.get("sliding_window"))
