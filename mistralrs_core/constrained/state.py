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
from mistralrs_core.constrained.masks import apply_banned, banned_tokens, fill_bitmask, new_bitmask


class SequenceGrammar:
    __slots__ = ("grammar", "matcher", "consumed", "error", "_banned", "_banned_at", "_job", "_job_at",
                 "_job_row")

    def __init__(self, grammar: CompiledGrammar):
        self.grammar = grammar
        self.matcher = grammar.new_matcher()
        self.consumed = 0                 # output tokens fed to the matcher
        self.error: str | None = None     # set when the matcher refused a token
        self._banned: torch.Tensor | None = None
        self._banned_at = -1              # the position _banned was computed for
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
        return (self.error is None and self._banned_at != self.consumed and self._job_at != self.consumed
                and not self.matcher.is_stopped())

    def attach_job(self, job: Future, row: int) -> None:
        self._job, self._job_at, self._job_row = job, self.consumed, row

    def _settle(self) -> None:
        job, self._job = self._job, None
        if job is None:
            return
        banned = job.result()
        if self._job_at == self.consumed:
            self._banned, self._banned_at = banned[self._job_row], self._job_at
        self._job_at = -1

    def banned(self) -> torch.Tensor:
        """Bool [>= vocab]: the tokens the grammar does not allow next."""
        self._settle()
        if self._banned_at != self.consumed:
            if self.error is not None:
                # A broken matcher allows nothing but an end token: the engine fails the
                # request after this step, and the row must still be drawable.
                banned = torch.ones(32 * ((self.grammar.vocab_size + 31) // 32), dtype=torch.bool)
                banned[list(self.grammar.eos_ids)] = False
            else:
                bitmask = new_bitmask(1, self.grammar.vocab_size)
                fill_bitmask(self.matcher, bitmask)
                banned = banned_tokens(bitmask)[0]
            self._banned, self._banned_at = banned, self.consumed
        return self._banned

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The logits processor: -inf on every token the grammar does not allow next."""
        self.sync(output_ids)
        banned = self.banned()
        if banned.device != logits.device:
            banned = banned.to(logits.device)
        apply_banned(logits, banned)
        return logits
