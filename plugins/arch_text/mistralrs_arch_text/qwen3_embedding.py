"""Qwen3-Embedding: a causal Qwen3 body pooled on its last token (the <|endoftext|> the
tokenizer appends), then L2-normalised."""
from __future__ import annotations

from mistralrs_arch_text.qwen3 import Qwen3ForCausalLM
from mistralrs_core.models.sentence import SentenceEmbeddingModel


class Qwen3Embedding(SentenceEmbeddingModel):
    backbone_cls = Qwen3ForCausalLM
    default_pooling = ("lasttoken",)
