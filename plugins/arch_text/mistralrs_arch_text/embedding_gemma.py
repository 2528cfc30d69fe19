"""EmbeddingGemma: a bidirectional Gemma 3 text body, mean-pooled, projected and normalised
by the sentence-transformers modules shipped with it."""
from __future__ import annotations

from mistralrs_arch_text.gemma3 import Gemma3ForCausalLM
from mistralrs_core.models.sentence import SentenceEmbeddingModel


class EmbeddingGemma(SentenceEmbeddingModel):
    backbone_cls = Gemma3ForCausalLM
    default_pooling = ("mean",)

    @classmethod
    def adjust_hf_config(cls, hf):
        # The released config says so explicitly; a config without the flag still means it.
        hf.setdefault("use_bidirectional_attention", True)
        return hf
