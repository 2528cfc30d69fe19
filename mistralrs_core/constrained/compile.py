"""From a request's ``grammar_type`` + ``grammar`` to a compiled grammar.

Compilation happens when the request is submitted, in the caller's thread (llguidance
drops the GIL while it builds the parser), so a grammar that does not compile is the
caller's ``ValueError`` and never reaches the engine. One compiled grammar serves all
``n`` choices of a request: each sequence gets a copy of the matcher in its start state.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable

import llguidance

from mistralrs_core.api.validate import GRAMMAR_TYPES
from mistralrs_core.constrained.vocab import grammar_tokenizer

# JSON on one line, spaced as Python's json.dumps writes it. llguidance's default lets any
# run of whitespace appear between tokens, and small models then spend their token budget
# on newlines and indentation (SmolLM2 ran out of max_tokens mid-object). A schema can ask
# for llguidance's defaults back with "x-guidance": {"whitespace_flexible": true}.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _from_json_schema(text: str) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)


# grammar_type -> llguidance grammar text. "llguidance" is already that text.
_BUILDERS: dict[str, Callable[[str], str]] = {
    "regex": llguidance.LLMatcher.grammar_from_regex,
    "json_schema": _from_json_schema,
    "lark": llguidance.LLMatcher.grammar_from_lark,
    "llguidance": lambda text: text,
}
assert set(_BUILDERS) == set(GRAMMAR_TYPES), "validate.GRAMMAR_TYPES and the builders disagree"


class CompiledGrammar:
    """A validated grammar bound to one model's vocabulary."""

    def __init__(self, grammar_type: str, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: frozenset[int]):
        self.grammar_type = grammar_type
        self._start = matcher          # never advanced: each sequence copies it
        self.vocab_size = vocab_size   # tokens the mask covers
        self.eos_ids = eos_ids

    def new_matcher(self) -> llguidance.LLMatcher:
        return self._start.deep_copy()


class GrammarCompiler:
    """Compiles grammars for one model. The llguidance tokenizer is built on first use
    (about 0.3 s for SmolLM2's 49k tokens, 3 s for Gemma 3's 262k) and then kept."""

    def __init__(self, tokenizer, eos_ids: Iterable[int]):
        self._tokenizer = tokenizer
        self._eos_ids = frozenset(int(i) for i in eos_ids)
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                self._ll = grammar_tokenizer(self._tokenizer, self._eos_ids)
            return self._ll

    def compile(self, grammar_type: str, grammar: str) -> CompiledGrammar:
        """``ValueError`` naming the field for an unknown type or a grammar that does not compile."""
        builder = _BUILDERS.get(grammar_type)
        if builder is None:
            raise ValueError(f"grammar_type: must be one of {', '.join(GRAMMAR_TYPES)}, got {grammar_type!r}")
        if not isinstance(grammar, str):
            raise ValueError(f"grammar: must be a string, got {type(grammar).__name__}")
        try:
            text = builder(grammar)
        except ValueError as exc:
            raise ValueError(f"grammar: {exc}") from None
        tok = self.ll_tokenizer
        # log_level=0: a bad grammar is reported through the ValueError, not on stderr.
        matcher = llguidance.LLMatcher(tok, text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"grammar: the {grammar_type} grammar does not compile: {matcher.get_error()}")
        return CompiledGrammar(grammar_type, matcher, tok.vocab_size, self._eos_ids)
