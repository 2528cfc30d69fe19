"""Gemma 2: Gemma with sandwich norms, logit soft-capping and alternating sliding/full layers."""
from __future__ import annotations

from mistralrs_arch_text.gemma import GemmaForCausalLM
from mistralrs_core.models.gemma_config import gemma2_fields
from mistralrs_core.models.text_config import base_config


class Gemma2ForCausalLM(GemmaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        return base_config(hf, **gemma2_fields(hf, sliding_every=2))
