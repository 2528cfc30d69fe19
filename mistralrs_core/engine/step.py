"""What the engine hands the model runner for one sequence in one step.

A ``StepRecord`` replaces the old ``(ids, start, blocks)`` tuple plus ``want_logits``
flag: it also carries the rope positions the model asked for (M-RoPE's 3 axes), the
encoder-feature spans the new tokens cover, the sequence's adapter, how many logits rows
it wants (k + 1 when k draft tokens are verified), its logits processors, and whether its
tokens are committed (draft tokens are not: their KV may be rolled back, so they never
enter the prefix cache until accepted).

A ``FeatureSpan`` is one encoder input (an image, an audio clip) whose features replace
the embeddings of ``length`` placeholder tokens starting at token ``start`` of the
prompt. Its features are computed once per request (shared by the ``n`` choices and by a
recompute after preemption) and sliced across prefill chunks, so a chunk may start or end
inside a span.
"""
from __future__ import annotations

from typing import Any, Callable

import attrs
import numpy as np
import torch


@attrs.define(eq=False)
class FeatureSpan:
    start: int                  # token index of the first placeholder in the prompt
    length: int                 # number of placeholder tokens (= feature rows)
    content_hash: bytes         # digest of the raw input: part of the prefix-cache key
    data: Any = None            # what the model's encoder takes (e.g. pixel values)
    bidirectional: bool = False  # tokens of the span attend to each other both ways (Gemma 3)
    features: torch.Tensor | None = None   # [length, hidden], filled by the model runner

    @property
    def end(self) -> int:
        return self.start + self.length

    def release(self) -> None:
        self.features = None
        self.data = None


@attrs.define(eq=False, slots=True)
class StepRecord:
    seq_id: int
    token_ids: list[int]                 # the new tokens this step computes
    start: int                           # position (index in the sequence) of token_ids[0]
    blocks: list[int]                    # the sequence's KV blocks (block table row)
    positions: np.ndarray | None = None  # [axes, n] rope positions; None = start .. start + n - 1
    spans: tuple[FeatureSpan, ...] = ()  # feature spans overlapping [start, start + n)
    adapter_id: str | None = None
    num_logits: int = 1                  # logits rows wanted: of the last num_logits tokens
    logits_processors: list[Callable] | None = None
    commit: bool = True                  # False: the tokens may be rolled back (drafts)
    state_slot: int | None = None        # per-sequence state slot (models that use slots)
    fresh_slot: bool = False             # first step since admission: the slot's state is another's

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    def span_rows(self):
        """(offset in this record, span, first span row, rows) for every span overlap."""
        for span in self.spans:
            lo, hi = max(span.start, self.start), min(span.end, self.end)
            if lo < hi:
                yield lo - self.start, span, lo - span.start, hi - lo


def record(token_ids: list[int], start: int, blocks: list[int], **kw) -> StepRecord:
    """A plain text record (tests, parity helpers)."""
    return StepRecord(seq_id=-1, token_ids=list(token_ids), start=start, blocks=blocks, **kw)
