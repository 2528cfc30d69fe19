"""Continuous batching over the paged block pool.

Each step: running sequences continue (decode, or the next chunk of a long prefill),
then waiting sequences are admitted while there is room in ``max_seqs``, the token
budget and the pool. When the pool cannot grow a running sequence, the most recently
admitted one is preempted: its blocks go back (still hashed, so a prefix-cache hit can
bring them back cheaply) and it is recomputed later.
"""
from __future__ import annotations

import time
from collections import deque

from mistralrs_core.engine.block_manager import BlockManager, NoFreeBlocks
from mistralrs_core.engine.sequence import Sequence, SeqStatus


class Scheduler:
    def __init__(self, blocks: BlockManager, max_seqs: int, max_batch_tokens: int,
                 no_kv_cache: bool = False):
        self.blocks = blocks
        self.max_seqs = max_seqs
        self.max_batch_tokens = max_batch_tokens
        self.no_kv_cache = no_kv_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.out_of_memory: list[Sequence] = []   # sequences the engine must end ("length")
        # Recurrent-state slots (layers/recurrent.py): one per admitted sequence, so max_seqs suffice.
        self.free_slots = list(range(max_seqs - 1, -1, -1))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release_slot(self, seq: Sequence) -> None:
        if seq.state_slot is not None:
            self.free_slots.append(seq.state_slot)
            seq.state_slot = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_slot(seq)
        self.blocks.release(seq.blocks)
        seq.block_hashes = []
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Sequences to run this step with how many new tokens each computes (for a
        decoding sequence with draft tokens: the last token plus its drafts)."""
        batch: list[tuple[Sequence, int]] = []
        budget = self.max_batch_tokens
        # Oldest first keeps latency fair; preemption takes from the newest.
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted below while making room for an older one
            if budget <= 0 and batch:
                continue
            remaining = seq.num_tokens - seq.num_computed
            if seq.draft and (remaining != 1 or 1 + len(seq.draft) > max(budget, 1)):
                seq.draft = []          # drafts are verified whole, with the token they follow
            n = _fit_spans(seq, seq.num_computed, min(remaining, max(budget, 1))) + len(seq.draft)
            while True:
                try:
                    self.blocks.grow(seq.blocks, seq.num_computed + n)
                    break
                except NoFreeBlocks:
                    if seq.draft:
                        seq.draft = []
                        n = 1
                        continue
                    if len(self.running) == 1:
                        # Alone and still no room: the pool is smaller than this sequence.
                        self.out_of_memory.append(seq)
                        self.running.remove(seq)
                        break
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is seq:
                        break
            if seq.status is SeqStatus.RUNNING and seq in self.running:
                batch.append((seq, n))
                budget -= n
        while self.waiting and len(self.running) < self.max_seqs and budget > 0:
            seq = self.waiting[0]
            if not seq.blocks and not self.no_kv_cache:
                seq.blocks, seq.block_hashes = self.blocks.match_prefix(seq.token_ids, _extras(seq))
                seq.num_computed = len(seq.blocks) * self.blocks.block_size
            n = _fit_spans(seq, seq.num_computed, min(seq.num_tokens - seq.num_computed, budget))
            try:
                self.blocks.grow(seq.blocks, seq.num_computed + n)
            except NoFreeBlocks:
                self.blocks.release(seq.blocks)
                seq.block_hashes = []
                seq.num_computed = 0
                if not self.running and not batch:
                    # Nothing will ever free a block for it: end it rather than spin.
                    self.waiting.popleft()
                    self.out_of_memory.append(seq)
                    continue
                break
            self.waiting.popleft()
            seq.state_slot = self.free_slots.pop()
            seq.slot_fresh = True
            seq.status = SeqStatus.RUNNING
            if seq.admitted_time is None:
                seq.admitted_time = time.perf_counter()
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def after_step(self, batch: list[tuple[Sequence, int]]) -> None:
        """Count the computed tokens; a step that verified drafts is settled by ``commit``."""
        for seq, n in batch:
            if n > 0 and not seq.draft:
                self.commit(seq, seq.num_computed + n)

    def commit(self, seq: Sequence, num_computed: int) -> None:
        """The KV of the first ``num_computed`` tokens is valid; anything computed past it
        (rejected draft tokens) is rolled back, and newly full blocks join the prefix cache."""
        seq.num_computed = num_computed
        seq.draft = []
        if self.no_kv_cache:
            return
        self.blocks.shrink(seq.blocks, seq.block_hashes, max(num_computed, 1))
        self.blocks.register_full_blocks(seq.blocks, seq.block_hashes, seq.token_ids, num_computed,
                                         _extras(seq))

    def finish(self, seq: Sequence) -> None:
        seq.status = SeqStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass
        self._release_slot(seq)
        self.blocks.release(seq.blocks)

    def reset_for_recompute(self, seq: Sequence) -> None:
        """no_kv_cache mode: forget the cache after every step and recompute next time."""
        self.blocks.release(seq.blocks)
        seq.block_hashes = []
        seq.num_computed = 0


def _extras(seq: Sequence):
    """The request's prefix-cache key extras (feature hashes, adapter, cache salt), if any."""
    return getattr(seq.group, "cache_extras", None)


def _fit_spans(seq: Sequence, start: int, n: int) -> int:
    """Shorten (or, when it starts there, stretch) a prefill chunk so that it never ends
    inside a bidirectional feature span: the span's first tokens attend to its last ones,
    which must be computed in the same step. Causal spans may be split: their features are
    sliced across chunks."""
    end = start + n
    for span in getattr(seq.group, "spans", ()):
        if span.bidirectional and span.start < end < span.end:
            end = span.start if span.start > start else span.end
    return end - start
