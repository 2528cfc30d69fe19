"""llguidance's view of a model tokenizer.

llguidance needs every token's bytes, which tokens are special, and which end generation.
The model's ``tokenizers.Tokenizer`` (from tokenizer.json, or built from GGUF metadata by
the quant plugin) serialises to the JSON llguidance reads; should that JSON ever be one
llguidance's embedded ``tokenizers`` cannot parse, the vocabulary is handed over as raw
bytes per id instead (``Tokenizer.token_bytes``, the same table logprobs use).
"""
from __future__ import annotations

import logging
from typing import Iterable

import llguidance

log = logging.getLogger("mistralrs")


class _ByteVocab:
    """The attributes ``llguidance.TokenizerWrapper`` reads, from our ``Tokenizer``."""

    def __init__(self, tokenizer, eos_ids: list[int]):
        n = tokenizer.vocab_size
        self.eos_token_id = eos_ids[0] if eos_ids else tokenizer.eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)]
        self.special_token_ids = sorted(tokenizer.special_ids)
        self._tokenizer = tokenizer

    def __call__(self, text):
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


def grammar_tokenizer(tokenizer, eos_ids: Iterable[int], *, from_bytes: bool = False) -> llguidance.LLTokenizer:
    """An ``LLTokenizer`` for ``tokenizer`` (our ``tokenization.Tokenizer``) whose end
    tokens are the engine's ``eos_ids``: the grammar lets one of them through only where
    the output may end. ``from_bytes`` forces the byte-table path (tests compare both)."""
    eos = sorted(int(i) for i in eos_ids) or [tokenizer.eos_token_id]
    n_vocab = tokenizer.vocab_size
    if not from_bytes:
        try:
            return llguidance.LLTokenizer(tokenizer.inner.to_str(), n_vocab=n_vocab, eos_token=eos)
        except Exception as exc:  # noqa: BLE001 - Rust errors surface as various types
            log.info("llguidance cannot read this tokenizer's JSON (%s); using its byte table", exc)
    wrapper = llguidance.TokenizerWrapper(_ByteVocab(tokenizer, eos))
    return llguidance.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=eos)
