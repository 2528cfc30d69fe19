"""Gemma 3 (text): Gemma 2 plus per-head q/k norms, a 5:1 local/global layer pattern whose
local layers use their own rope base, and optional bidirectional attention (EmbeddingGemma).
The config rules live in core (``models/gemma_config.py``): the vision Gemma 3 shares them."""
from __future__ import annotations

from mistralrs_arch_text.gemma2 import Gemma2ForCausalLM
from mistralrs_core.models.gemma_config import gemma3_config


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        return gemma3_config(hf)
