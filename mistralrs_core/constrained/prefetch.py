"""Computing the next step's masks off the critical path.

As soon as a step's tokens are consumed, the engine hands the constrained sequences to
``start``; one worker thread fills all their bitmasks in a single llguidance call (which
drops the GIL and spreads the matchers over its own threads) and unpacks them, while the
engine thread schedules and runs the model's next forward. The sampler then finds each
mask ready (``SequenceGrammar`` joins the job). One call per batch rather than one per
sequence matters: a thread that re-takes the GIL after each short native call can wait a
whole switch interval (5 ms) each time the engine thread holds it.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import llguidance
import torch

from mistralrs_core.constrained.masks import mask_bias, new_bitmask
from mistralrs_core.constrained.state import SequenceGrammar


class MaskPrefetcher:
    def __init__(self, device: str | torch.device = "cpu", threads: int | None = None):
        self.device = torch.device(device)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mistralrs-grammar")
        # Masks take microseconds each; a few threads are plenty next to the model's own.
        self._executor = llguidance.LLExecutor(num_threads=threads or max(1, min(4, (os.cpu_count() or 2) // 2)))
        self.jobs = 0

    def start(self, states: Iterable[SequenceGrammar]) -> None:
        """Begin computing the current-position mask of every state that lacks one."""
        todo = [s for s in states if s.wants_mask()]
        if not todo:
            return
        vocab = max(s.grammar.vocab_size for s in todo)
        pairs = [(s.matcher, i) for i, s in enumerate(todo)]
        job = self._pool.submit(self._fill, pairs, vocab)
        for i, s in enumerate(todo):
            s.attach_job(job, i)
        self.jobs += 1

    def _fill(self, pairs, vocab: int) -> torch.Tensor:
        bitmask = new_bitmask(len(pairs), vocab)
        self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, len(pairs))
        bias = mask_bias(bitmask)
        return bias.to(self.device) if self.device.type != "cpu" else bias

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
