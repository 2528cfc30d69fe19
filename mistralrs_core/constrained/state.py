"""One sequence's grammar: its matcher, how many of its output tokens it has consumed,
and the mask for the next token.

The engine owns it. Tokens are consumed by ``sync(output_ids)``, which feeds the matcher
the tokens it has not seen yet: calling it again (a preempted sequence recomputed, a
second sampler pass) never consumes a token twice, because the count of consumed tokens
is the matcher's position. A mask is valid for the position it was computed at; the
``MaskPrefetcher`` computes it ahead on a worker thread, and ``__call__`` (the sequence's
last logits processor) waits for it, or computes it on the spot when nothing was
prefetched (first token after a prefill chunk nobody foresaw, draft verification rows).

The matcher is only advanced by the engine thread and only while no worker job reads it
(``sync`` settles a pending job first).
"""
from __future__ import annotations

from concurrent.futures import Future

import torch

from mistralrs_core.constrained.compile import CompiledGrammar
from mistralrs_core.constrained.masks import apply_bias, fill_bitmask, mask_bias, new_bitmask


class SequenceGrammar:
    __slots__ = ("grammar", "matcher", "consumed", "error", "_bias", "_bias_at", "_job", "_job_at", "_job_row")

    def __init__(self, grammar: CompiledGrammar):
        self.grammar = grammar
        self.matcher = grammar.new_matcher()
        self.consumed = 0                 # output tokens fed to the matcher
        self.error: str | None = None     # set when the matcher refused a token
        self._bias: torch.Tensor | None = None
        self._bias_at = -1                # the position _bias was computed for
        self._job: Future | None = None   # a prefetch job computing this position's mask
        self._job_at = -1
        self._job_row = 0

    # --- position ---------------------------------------------------------
    def sync(self, output_ids: list[int]) -> None:
        """Consume the output tokens the matcher has not seen."""
        if len(output_ids) <= self.consumed:
            return
        self._settle()
        for tid in output_ids[self.consumed:]:
            self.consumed += 1
            if self.error is None and not self.matcher.consume_token(int(tid)):
                self.error = self.matcher.get_error() or f"token {tid} is not allowed by the grammar"

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more (not even more whitespace)."""
        return self.error is None and self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.error is None and self.matcher.is_accepting()

    # --- masks ------------------------------------------------------------
    def wants_mask(self) -> bool:
        """No mask for the current position is computed or under way."""
        return (self.error is None and self._bias_at != self.consumed and self._job_at != self.consumed
                and not self.matcher.is_stopped())

    def attach_job(self, job: Future, row: int) -> None:
        self._job, self._job_at, self._job_row = job, self.consumed, row

    def _settle(self) -> None:
        job, self._job = self._job, None
        if job is None:
            return
        bias = job.result()
        if self._job_at == self.consumed:
            self._bias, self._bias_at = bias[self._job_row], self._job_at
        self._job_at = -1

    def bias(self) -> torch.Tensor:
        """Float [>= vocab]: 0 for the tokens the grammar allows next, -inf for the rest."""
        self._settle()
        if self._bias_at != self.consumed:
            if self.error is not None:
                # A broken matcher allows nothing but an end token: the engine fails the
                # request after this step, and the row must still be drawable.
                bias = torch.full((32 * ((self.grammar.vocab_size + 31) // 32),), float("-inf"))
                bias[sorted(self.grammar.eos_ids)] = 0.0
            else:
                bitmask = new_bitmask(1, self.grammar.vocab_size)
                fill_bitmask(self.matcher, bitmask)
                bias = mask_bias(bitmask)[0]
            self._bias, self._bias_at = bias, self.consumed
        return self._bias

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The logits processor: -inf on every token the grammar does not allow next."""
        self.sync(output_ids)
        bias = self.bias()
        if bias.device != logits.device:
            bias = bias.to(logits.device)
        apply_bias(logits, bias)
        return logits
