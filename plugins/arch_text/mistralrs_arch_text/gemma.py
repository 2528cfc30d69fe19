"""Gemma: Llama with (1 + w) norms, embeddings scaled by sqrt(hidden) and a tanh GELU."""
from __future__ import annotations

from mistralrs_arch_text.llama import LlamaForCausalLM
from mistralrs_core.models.gemma_config import gemma_fields
from mistralrs_core.models.text_config import base_config


class GemmaForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        return base_config(hf, **gemma_fields(hf))
