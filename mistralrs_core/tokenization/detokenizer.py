"""Streaming token ids to text without ever showing a broken character.

Decoding one token at a time is wrong twice over: a multi-byte character may be split
across tokens (byte-level BPE, SentencePiece byte fallback), and SentencePiece decoders
drop the leading space of whatever token comes first in a decode call. So each step
decodes a short window that starts a little before the new tokens ("prefix") and emits
only what the window adds beyond the prefix, and only once the tail is a whole character.
"""

from __future__ import annotations

from typing import Iterable, Sequence

REPLACEMENT_CHAR = "\ufffd"
# Tokens of prompt context kept so the first generated token decodes as it would mid-text.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Feed ids with `push`; concatenated deltas plus `flush()` equal `tokenizer.decode(ids)`.

    `prompt_ids` (optional) gives context whose text is not emitted; with it, deltas equal
    decode(prompt + generated) minus decode(prompt), e.g. keeping the leading space of a
    SentencePiece continuation. Without it, output matches decoding the pushed ids alone.

    `keep_ids`: special tokens that stay in the text even when skipping the others (the
    markers of tool calls, which the tool-call parser reads and then removes from content).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True, prompt_ids: Sequence[int] = (),
                 keep_ids: frozenset[int] = frozenset()):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._skipped = (set(tokenizer.special_ids) - set(keep_ids)) if skip_special_tokens else frozenset()
        context: list[int] = []
        for i in reversed(prompt_ids):  # from the end: prompts can be very long
            if len(context) == _CONTEXT_TOKENS:
                break
            if int(i) not in self._skipped:
                context.append(int(i))
        context.reverse()
        self._ids: list[int] = list(context)
        self._n_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(self._ids) if context else ""
        self._context_text = self._prefix_text
        self._text_parts: list[str] = []
        self._n_pushed = 0
        self._flushed = False

    def _decode(self, ids: Sequence[int]) -> str:
        # Specials were already dropped on push, so decoding them again must not re-filter
        # differently from the final full decode.
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)

    @property
    def token_ids(self) -> list[int]:
        """The ids that contribute text (specials removed when skipping), excluding prompt context."""
        return self._ids[self._n_context:]

    def push(self, token_id: int) -> str:
        """Add one token; return the newly final text (possibly "")."""
        token_id = int(token_id)
        self._n_pushed += 1
        if token_id in self._skipped:
            return ""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix_offset:])
        if len(window) <= len(self._prefix_text) or window.endswith(REPLACEMENT_CHAR):
            # Either nothing visible yet (a byte of a longer character, a piece that only
            # changes spacing) or an unfinished character: wait for the next token.
            return ""
        delta = window[len(self._prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        self._text_parts.append(delta)
        return delta

    def push_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character becomes U+FFFD)."""
        if self._flushed:
            return ""
        self._flushed = True
        emitted = self.text
        # A full decode is the ground truth; use it whenever it agrees with what was
        # already streamed, which is always the case for well-behaved decoders.
        full = self._decode(self._ids)
        head = self._context_text
        if full.startswith(head) and full.startswith(emitted, len(head)):
            rest = full[len(head) + len(emitted):]
        else:
            window = self._decode(self._ids[self._prefix_offset:])
            rest = window[len(self._prefix_text):] if len(window) > len(self._prefix_text) else ""
        if rest:
            self._text_parts.append(rest)
        return rest
