"""One background thread per loaded model: schedule, run, sample, deliver.

Callers hand in a ``RequestGroup`` (one request, ``n`` sequences) and wait on its queue;
the engine thread owns every sequence while it runs. Per step it does one model call for
the whole batch, one sampler call, then per-sequence bookkeeping (stop checks and
detokenisation). Model errors fail the requests of that batch only.
"""
from __future__ import annotations

import atexit
import logging
import queue
import random
import threading
import time
import traceback
from typing import Callable

import weakref

import attrs
import torch

from mistralrs_core.engine.block_manager import BlockManager
from mistralrs_core.engine.model_runner import ModelRunner
from mistralrs_core.engine.scheduler import Scheduler
from mistralrs_core.engine.sequence import Sequence, SeqStatus
from mistralrs_core.layers.recurrent import has_recurrent_state
from mistralrs_core.sampling.sampler import Sampler
from mistralrs_core.sampling.state import SamplingState
from mistralrs_core.tokenization.detokenizer import IncrementalDetokenizer

log = logging.getLogger("mistralrs")

_LIVE_ENGINES: "weakref.WeakSet[Engine]"


def _stop_all_engines() -> None:
    # Daemon threads killed mid-op at interpreter exit abort the process; stop them first.
    for engine in list(_LIVE_ENGINES):
        engine.shutdown()


@attrs.define
class EngineConfig:
    max_seqs: int = 16
    block_size: int = 32
    num_blocks: int = 256
    prefix_cache: bool = True
    no_kv_cache: bool = False
    max_batch_tokens: int = 2048
    seed: int | None = None
    device: str = "cpu"
    cache_dtype: torch.dtype = torch.float32


_LIVE_ENGINES = weakref.WeakSet()
atexit.register(_stop_all_engines)


class RequestGroup:
    """A request in flight. While streaming, ``events`` receives
    ("delta", choice_index, text, sampled_token | None, finish_reason | None) tuples; every
    request ends with ("done", ...) or ("error", message, ...)."""

    def __init__(self, prompt_ids: list[int], params, n: int, stream: bool, max_tokens: int,
                 stop_strings: tuple[str, ...] = (), logits_processors: list[Callable] | None = None,
                 seed: int | None = None):
        self.seed = seed
        self.prompt_ids = prompt_ids
        self.params = params
        self.n = n
        self.stream = stream
        self.max_tokens = max_tokens
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.logits_processors = logits_processors
        self.events: queue.Queue = queue.Queue()
        self.seqs: list[Sequence] = []
        self.cancelled = False
        self.error: str | None = None
        self.created = time.time()
        self.t_submit = time.perf_counter()
        self.t_done: float | None = None

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.seqs)


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig, eos_ids: set[int], name: str = "default"):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.eos_ids = set(eos_ids)
        self.name = name
        # A recurrent state summarises a whole prefix, which shared prefix-cache blocks cannot
        # restore: models with recurrent layers run without prefix caching.
        self.stateful = has_recurrent_state(model.kv_cache_specs())
        self.blocks = BlockManager(config.num_blocks, config.block_size,
                                   enable_prefix_cache=(config.prefix_cache and not config.no_kv_cache
                                                        and not self.stateful))
        self.scheduler = Scheduler(self.blocks, config.max_seqs, config.max_batch_tokens, config.no_kv_cache)
        self.runner = ModelRunner(model, config.num_blocks, config.block_size, config.device, config.cache_dtype,
                                  num_state_slots=config.max_seqs)
        self.sampler = Sampler()
        self.max_context = getattr(model, "max_context_len", 4096)
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        self._rng = random.Random(config.seed)
        self.stats = {"steps": 0, "prompt_tokens_computed": 0, "generated_tokens": 0, "requests": 0,
                      "tokens_computed": 0}
        self._thread = threading.Thread(target=self._loop, name=f"mistralrs-engine-{name}", daemon=True)
        self._thread.start()
        _LIVE_ENGINES.add(self)

    # --- caller side ----------------------------------------------------
    def capacity_tokens(self) -> int:
        return self.config.num_blocks * self.config.block_size

    def submit(self, group: RequestGroup) -> None:
        for i in range(group.n):
            # A per-request seed makes that request reproducible on its own; otherwise the
            # runner seed drives a stream of per-sequence seeds.
            seed = (group.seed * 1000003 + i) % (1 << 63) if group.seed is not None else self._rng.getrandbits(63)
            gen = torch.Generator().manual_seed(seed)
            state = SamplingState(group.params, group.prompt_ids, [], gen)
            detok = IncrementalDetokenizer(self.tokenizer, True, group.prompt_ids)
            seq = Sequence(group, i, group.prompt_ids, state, detok, group.max_tokens)
            seq.output_ids = state.output_ids
            group.seqs.append(seq)
        self.stats["requests"] += 1
        self._inbox.put(group)
        self._wake.set()

    def cancel(self, group: RequestGroup) -> None:
        group.cancelled = True
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + self._inbox.qsize()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def snapshot(self) -> dict:
        """Live counters for monitoring. Read from another thread without locking: each value
        is a single atomic read, so the view may be a step stale but never torn."""
        return {"waiting": self.num_waiting, "running": self.num_running,
                "kv_blocks_used": self.blocks.num_used, "kv_blocks_total": self.blocks.num_blocks,
                "kv_block_size": self.blocks.block_size, **self.stats}

    # --- engine thread --------------------------------------------------
    def _drain_inbox(self) -> None:
        while True:
            try:
                group = self._inbox.get_nowait()
            except queue.Empty:
                return
            for seq in group.seqs:
                self.scheduler.add(seq)

    def _reap_cancelled(self) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.group.cancelled and not seq.finished:
                seq.finish_reason = seq.finish_reason or "cancelled"
                self._finish(seq)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop:
            self._drain_inbox()
            self._reap_cancelled()
            if not self.scheduler.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as exc:  # never let one bad batch kill the engine
                log.error("engine step failed: %s\n%s", exc, traceback.format_exc())
                for seq in list(self.scheduler.running):
                    self._fail(seq.group, f"{type(exc).__name__}: {exc}")

    def _step(self) -> None:
        batch = self.scheduler.schedule()
        for seq in self.scheduler.out_of_memory:
            seq.finish_reason = "length"
            self._finish(seq)
        self.scheduler.out_of_memory.clear()
        if not batch:
            return
        chunks, want = [], []
        for seq, n in batch:
            start = seq.num_computed
            chunks.append((seq.token_ids[start:start + n], start, seq.blocks))
            want.append(start + n == seq.num_tokens)
        slots = {"state_slots": [seq.state_slot for seq, _ in batch]} if self.stateful else {}
        try:
            logits = self.runner.run(chunks, want, **slots)
        except Exception as exc:
            log.error("model forward failed: %s\n%s", exc, traceback.format_exc())
            for seq, _ in batch:
                self._fail(seq.group, f"model error: {type(exc).__name__}: {exc}")
            return
        self.scheduler.after_step(batch)
        self.stats["steps"] += 1
        sampled = [seq for (seq, _), w in zip(batch, want) if w]
        for seq, n in batch:
            self.stats["tokens_computed"] += n
            if seq.first_token_time is None:
                self.stats["prompt_tokens_computed"] += n
        if sampled:
            procs = None
            if any(s.group.logits_processors for s in sampled):
                procs = [s.group.logits_processors[s.index] if s.group.logits_processors else None
                         for s in sampled]
            outs = self.sampler.sample(logits, [s.state for s in sampled], processors=procs)
            now = time.perf_counter()
            for seq, tok in zip(sampled, outs):
                if seq.first_token_time is None:
                    seq.first_token_time = now
                self._append_token(seq, tok)
        if self.config.no_kv_cache:
            for seq, _ in batch:
                if not seq.finished:
                    self.scheduler.reset_for_recompute(seq)

    def _append_token(self, seq: Sequence, tok) -> None:
        group = seq.group
        tid = tok.token_id
        seq.output_ids.append(tid)
        self.stats["generated_tokens"] += 1
        if group.params.logprobs:
            seq.logprobs.append(tok)
        params = group.params
        if (tid in self.eos_ids and not params.ignore_eos) or tid in params.stop_token_ids:
            seq.finish_reason = "stop"
            self._finish(seq)
            return
        delta = seq.detok.push(tid)
        if delta:
            seq.text += delta
        if group.stop_strings and delta and self._check_stop_strings(seq, len(delta)):
            self._finish(seq)
            return
        if len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_context:
            seq.finish_reason = "length"
            self._finish(seq)
            return
        if group.stream:
            self._emit(seq)

    def _check_stop_strings(self, seq: Sequence, delta_len: int) -> bool:
        longest = max(len(s) for s in seq.group.stop_strings)
        start = max(0, len(seq.text) - delta_len - longest + 1)
        hits = [i for i in (seq.text.find(s, start) for s in seq.group.stop_strings) if i >= 0]
        if not hits:
            return False
        seq.stop_at = min(hits)
        seq.text = seq.text[:seq.stop_at]
        seq.finish_reason = "stop"
        return True

    def _safe_emit_len(self, seq: Sequence) -> int:
        """Characters of ``seq.text`` that can be shown: hold back a tail that might be the
        beginning of a stop string."""
        text = seq.text
        if seq.finished or not seq.group.stop_strings:
            return len(text)
        hold = 0
        for s in seq.group.stop_strings:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return len(text) - hold

    def _emit(self, seq: Sequence) -> None:
        end = self._safe_emit_len(seq)
        delta = seq.text[seq.emitted:end] if end > seq.emitted else ""
        lp = None
        if seq.group.params.logprobs and seq.logprobs:
            lp = seq.logprobs[-1]
        if delta or lp is not None or seq.finished:
            seq.emitted = max(seq.emitted, end)
            seq.group.events.put(("delta", seq.index, delta, lp, seq.finish_reason))

    def _finish(self, seq: Sequence) -> None:
        if seq.finished:
            return
        if seq.finish_reason != "stop" or seq.stop_at is None:
            tail = seq.detok.flush()
            if tail and seq.finish_reason != "cancelled":
                seq.text += tail
        self.scheduler.finish(seq)
        group = seq.group
        if group.stream:
            self._emit(seq)
        if group.done:
            group.t_done = time.perf_counter()
            group.events.put(("done", None, None, None, None))

    def _fail(self, group: RequestGroup, message: str) -> None:
        group.error = message
        for seq in group.seqs:
            if not seq.finished:
                seq.finish_reason = "error"
                seq.status = SeqStatus.FINISHED
                self.scheduler.finish(seq)
        group.events.put(("error", message, None, None, None))
