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

from mistralrs_core.engine.block_manager import BlockKeyExtras, BlockManager
from mistralrs_core.engine.model_runner import ModelRunner
from mistralrs_core.engine.scheduler import Scheduler
from mistralrs_core.engine.sequence import Sequence, SeqStatus
from mistralrs_core.engine.speculative import rejection_sample
from mistralrs_core.engine.step import FeatureSpan, StepRecord
from mistralrs_core.errors import EngineStopped, QueueFull
from mistralrs_core.models.positions import PromptPositions
from mistralrs_core.layers.recurrent import has_recurrent_state
from mistralrs_core import progress
from mistralrs_core.plugins import make_sampler
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
    # Admission control: submit() refuses a request (QueueFull) that would make more than
    # this many sequences wait for a batch slot; None queues without bound.
    max_waiting: int | None = None
    # Seconds a request may take from submit to its last token; None: no limit.
    request_timeout: float | None = None


_LIVE_ENGINES = weakref.WeakSet()
atexit.register(_stop_all_engines)


class RequestGroup:
    """A request in flight. While streaming, ``events`` receives
    ("delta", choice_index, text, sampled_token | None, finish_reason | None) tuples; every
    request ends with ("done", ...) or ("error", message, ...).

    ``spans``: encoder inputs (``FeatureSpan``) whose features replace placeholder tokens of
    the prompt; ``logits_processors``: per choice a processor or None; ``adapter_id`` and
    ``cache_salt`` (tenant isolation) separate prefix-cache entries; ``keep_special_ids``:
    special tokens kept in the decoded text (tool-call markers); ``grammar``: a
    ``constrained.CompiledGrammar`` every choice must follow (each gets its own matcher)."""

    def __init__(self, prompt_ids: list[int], params, n: int, stream: bool, max_tokens: int,
                 stop_strings: tuple[str, ...] = (), logits_processors: list[Callable | None] | None = None,
                 seed: int | None = None, spans: tuple[FeatureSpan, ...] = (), adapter_id: str | None = None,
                 cache_salt: str | None = None, keep_special_ids: frozenset[int] = frozenset(),
                 grammar=None):
        self.seed = seed
        self.keep_special_ids = keep_special_ids
        self.grammar = grammar
        self.prompt_ids = prompt_ids
        self.spans = tuple(sorted(spans, key=lambda sp: sp.start))
        self.adapter_id = adapter_id
        self.cache_salt = cache_salt
        self.cache_extras = None           # prefix-cache key extras, set by the engine
        self.positions: PromptPositions | None = None   # set by the engine from the model
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
        self.error_kind: str | None = None   # "model", "timeout" or "stopped"
        self.created = time.time()
        self.t_submit = time.perf_counter()
        self.t_done: float | None = None
        self.deadline: float | None = None   # perf_counter time; set by the engine
        self.draft_tokens = 0             # speculative decoding: drafts verified for this request
        self.accepted_draft_tokens = 0    # ... and how many of them were kept

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.seqs)


def _chain(first: Callable, last: Callable) -> Callable:
    def chained(output_ids, logits):
        out = first(output_ids, logits)
        return last(output_ids, logits if out is None else out)
    return chained


class Engine:
    """``drafter``: an optional object whose ``propose(seqs) -> list[list[int]]`` suggests
    tokens to follow each decoding sequence; the engine verifies them in one step (k + 1
    logits rows), keeps the agreeing prefix plus one sampled token, and rolls back the KV
    of the rest. The output is exactly what plain decoding samples (each kept token is the
    target model's own draw), only in fewer steps when the drafts are good. A drafter may
    also offer ``draft_probs(seq, drafts)`` (the distribution sampled drafts were drawn from:
    verified by rejection sampling instead) and ``release(seq)`` (a sequence ended); see
    ``speculative.py``."""

    def __init__(self, model, tokenizer, config: EngineConfig, eos_ids: set[int], name: str = "default",
                 drafter=None):
        self.model = model
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.config = config
        self.eos_ids = set(eos_ids)
        self.name = name
        # A recurrent state summarises a whole prefix, which shared prefix-cache blocks cannot
        # restore: models with recurrent layers run without prefix caching.
        self.stateful = has_recurrent_state(model.kv_cache_specs())
        # Per-sequence state outside the paged cache (recurrent states, Mllama's cross-attention
        # K/V) lives in slots: one per admitted sequence, handed to the model in each step.
        self.slotted = self.stateful or bool(getattr(model, "uses_state_slots", False))
        self.blocks = BlockManager(config.num_blocks, config.block_size,
                                   enable_prefix_cache=(config.prefix_cache and not config.no_kv_cache
                                                        and not self.stateful))
        self.scheduler = Scheduler(self.blocks, config.max_seqs, config.max_batch_tokens, config.no_kv_cache)
        # A tensor-parallel model brings the runner that broadcasts each step to the other ranks.
        runner_cls = getattr(model, "model_runner_cls", None) or ModelRunner
        self.runner = runner_cls(model, config.num_blocks, config.block_size, config.device, config.cache_dtype,
                                  num_state_slots=config.max_seqs)
        self.sampler = make_sampler()
        self.max_context = getattr(model, "max_context_len", 4096)
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        # Orders submit() against admission and shutdown: no group may slip into the inbox
        # after the engine thread drained it for the last time.
        self._admit = threading.Lock()
        self._stopped = False
        self._rng = random.Random(config.seed)
        self.stats = {"steps": 0, "prompt_tokens_computed": 0, "generated_tokens": 0, "requests": 0,
                      "tokens_computed": 0, "draft_tokens": 0, "accepted_draft_tokens": 0}
        self._masks = None   # constrained.MaskPrefetcher, made with the first constrained request
        # in_context: kernels built on first use inside a step honour the load's progress setting.
        self._thread = threading.Thread(target=progress.in_context(self._loop), name=f"mistralrs-engine-{name}",
                                        daemon=True)
        self._thread.start()
        _LIVE_ENGINES.add(self)

    # --- caller side ----------------------------------------------------
    def capacity_tokens(self) -> int:
        return self.config.num_blocks * self.config.block_size

    def submit(self, group: RequestGroup) -> None:
        if group.spans or group.adapter_id is not None or group.cache_salt is not None:
            group.cache_extras = BlockKeyExtras.make(
                cache_salt=group.cache_salt, adapter_id=group.adapter_id,
                spans=[(sp.start, sp.end, sp.content_hash) for sp in group.spans],
                spans_key_whole_prompt=self.slotted)
        group.positions = self.model.prompt_positions(group.prompt_ids, group.spans)
        for i in range(group.n):
            # A per-request seed makes that request reproducible on its own; otherwise the
            # runner seed drives a stream of per-sequence seeds.
            seed = (group.seed * 1000003 + i) % (1 << 63) if group.seed is not None else self._rng.getrandbits(63)
            gen = torch.Generator().manual_seed(seed)
            state = SamplingState(group.params, group.prompt_ids, [], gen)
            detok = IncrementalDetokenizer(self.tokenizer, True, group.prompt_ids,
                                           keep_ids=group.keep_special_ids)
            seq = Sequence(group, i, group.prompt_ids, state, detok, group.max_tokens)
            seq.output_ids = state.output_ids   # the sampler reads the same list
            procs = group.logits_processors[i] if group.logits_processors else None
            if group.grammar is not None:
                from mistralrs_core.constrained.state import SequenceGrammar
                seq.grammar = SequenceGrammar(group.grammar)
                # Last, so that no other processor can lift a token the grammar bans.
                procs = seq.grammar if procs is None else _chain(procs, seq.grammar)
            seq.processor = procs
            group.seqs.append(seq)
        self._admit_group(group)
        self._wake.set()

    def _admit_group(self, group: RequestGroup) -> None:
        with self._admit:
            if self._stop or self._stopped:
                raise EngineStopped(f"model {self.name!r} is shutting down (unloaded or the server is "
                                    f"stopping); send the request again")
            limit = self.config.max_waiting
            if limit is not None:
                # Sequences that would wait: those queued plus these, less the free batch slots.
                free = max(0, self.config.max_seqs - self.num_running)
                if self.num_waiting + group.n - free > limit:
                    raise QueueFull(f"model {self.name!r} is busy: {self.num_waiting} sequences queued for "
                                    f"{free} free batch slots (the queue limit is {limit}); retry later")
            if self.config.request_timeout is not None:
                group.deadline = group.t_submit + self.config.request_timeout
            self.stats["requests"] += 1
            self._inbox.put(group)

    def weights_changed(self) -> None:
        """The model's weights were replaced (``send_re_isq``): the engine thread drops the
        prefix cache before it schedules anything else, so no later request reuses K/V
        computed with the old weights."""
        self._forget_prefixes = True
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
        now = time.perf_counter()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            group = seq.group
            if seq.finished:
                continue
            if group.cancelled:
                seq.finish_reason = seq.finish_reason or "cancelled"
                self._finish(seq)
            elif group.deadline is not None and now > group.deadline:
                self._fail(group, f"request timed out: still running after "
                                  f"{self.config.request_timeout:g} s (the request_timeout)", timed_out=True)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            self._run_loop()
        finally:
            try:
                self._fail_all_pending()
            finally:
                if self._masks is not None:
                    self._masks.close()

    def _run_loop(self) -> None:
        while not self._stop:
            if self.__dict__.pop("_forget_prefixes", False):
                self.blocks.forget_prefixes()
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

    def _fail_all_pending(self) -> None:
        """Requests still in flight when the engine stops (unload, shutdown) end with an
        error instead of leaving their callers waiting forever."""
        with self._admit:
            self._stopped = True
        self._drain_inbox()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if not seq.finished:
                self._fail(seq.group, f"model {self.name!r} was unloaded or shut down while this request "
                                      f"was running; send it again", stopped=True)

    def _propose_drafts(self) -> None:
        seqs = [s for s in self.scheduler.running if s.decoding and not s.finished]
        if not seqs or self.config.no_kv_cache:
            return
        for seq, draft in zip(seqs, self.drafter.propose(seqs)):
            # Never draft past the sequence's limits: each kept token must be one it may emit.
            room = min(seq.max_tokens - len(seq.output_ids), self.max_context - seq.num_tokens) - 1
            seq.draft = list(draft[:max(room, 0)])

    def _record(self, seq: Sequence, n: int) -> StepRecord:
        group, start = seq.group, seq.num_computed
        if seq.draft:
            ids = [seq.token_ids[-1], *seq.draft]
            wanted = len(ids)
        else:
            ids = seq.token_ids[start:start + n]
            wanted = 1 if start + n == seq.num_tokens else 0
        return StepRecord(
            seq_id=seq.id, token_ids=ids, start=start, blocks=seq.blocks,
            positions=group.positions.slice(start, len(ids)) if group.positions is not None else None,
            spans=group.spans if group.spans and start < seq.prompt_len else (),
            adapter_id=group.adapter_id, num_logits=wanted,
            logits_processors=seq.processor, commit=not seq.draft,
            state_slot=seq.state_slot if self.slotted else None, fresh_slot=self._take_fresh(seq))

    @staticmethod
    def _take_fresh(seq: Sequence) -> bool:
        fresh, seq.slot_fresh = seq.slot_fresh, False
        return fresh

    def _step(self) -> None:
        if self.drafter is not None:
            self._propose_drafts()
        batch = self.scheduler.schedule()
        for seq in self.scheduler.out_of_memory:
            seq.finish_reason = "length"
            self._finish(seq)
        self.scheduler.out_of_memory.clear()
        if not batch:
            return
        records = [self._record(seq, n) for seq, n in batch]
        # Masks for the rows sampled this step that no earlier step started (a prompt's
        # first token): computed while the model runs.
        self._prefetch_masks(seq for (seq, _), rec in zip(batch, records) if rec.num_logits)
        try:
            logits = self.runner.run(records)
        except Exception as exc:
            log.error("model forward failed: %s\n%s", exc, traceback.format_exc())
            for seq, _ in batch:
                self._fail(seq.group, f"model error: {type(exc).__name__}: {exc}")
            return
        self.scheduler.after_step(batch)
        self.stats["steps"] += 1
        singles, rows, verify, off = [], [], [], 0
        for (seq, n), rec in zip(batch, records):
            self.stats["tokens_computed"] += n
            if seq.first_token_time is None:
                self.stats["prompt_tokens_computed"] += n
            if not rec.commit:
                verify.append((seq, rec, logits[off:off + rec.num_logits]))
            elif rec.num_logits:
                singles.append((seq, rec))
                rows.append(off)
            off += rec.num_logits
        now = time.perf_counter()
        if singles:
            sel = logits if len(rows) == logits.shape[0] else logits[rows]
            procs = None
            if any(r.logits_processors is not None for _, r in singles):
                procs = [r.logits_processors for _, r in singles]
            # The logits are inference tensors (made under inference_mode), which may be edited
            # in place only under it too.
            with torch.inference_mode():
                outs = self.sampler.sample(sel, [s.state for s, _ in singles], processors=procs,
                                           may_edit_logits=True)
            for (seq, _), tok in zip(singles, outs):
                if seq.finished:
                    continue   # a sibling choice failed the request (a grammar error)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                self._append_token(seq, tok)
        for seq, rec, seq_logits in verify:
            self._verify(seq, rec, seq_logits)
        # The next step's masks depend only on the tokens just consumed: start them now,
        # so that they are computed while the next forward runs.
        self._prefetch_masks(self.scheduler.running)
        if self.config.no_kv_cache:
            for seq, _ in batch:
                if not seq.finished:
                    self.scheduler.reset_for_recompute(seq)

    def _prefetch_masks(self, seqs) -> None:
        states = [s.grammar for s in seqs if s.grammar is not None and not s.finished]
        if not states:
            return
        if self._masks is None:
            from mistralrs_core.constrained.prefetch import MaskPrefetcher
            self._masks = MaskPrefetcher(self.config.device)
        self._masks.start(states)

    def _verify(self, seq: Sequence, rec: StepRecord, logits: torch.Tensor) -> None:
        """Sample row by row while the samples agree with the drafts; keep those plus the
        first disagreeing (or bonus) sample, and roll the KV back to what they cover. Drafts
        that come with their draft distribution are verified by rejection sampling instead."""
        drafts = rec.token_ids[1:]
        # A draft model's sampled drafts come with the distribution they were drawn from:
        # rejection sampling (speculative.py) keeps more of them than exact match does.
        draft_probs = getattr(self.drafter, "draft_probs", None)
        q = draft_probs(seq, drafts) if draft_probs is not None else None
        if q is not None:
            accepted = rejection_sample(seq, logits, drafts, q, rec.logits_processors, self._append_token)
        else:
            procs = [rec.logits_processors] if rec.logits_processors is not None else None
            accepted = 0
            for i in range(logits.shape[0]):
                with torch.inference_mode():
                    tok = self.sampler.sample(logits[i:i + 1], [seq.state], processors=procs,
                                              may_edit_logits=True)[0]
                self._append_token(seq, tok)
                if seq.finished or i >= len(drafts) or tok.token_id != drafts[i]:
                    break
                accepted += 1
        self.stats["draft_tokens"] += len(drafts)
        self.stats["accepted_draft_tokens"] += accepted
        seq.group.draft_tokens += len(drafts)
        seq.group.accepted_draft_tokens += accepted
        if not seq.finished:
            self.scheduler.commit(seq, rec.start + 1 + accepted)

    def _append_token(self, seq: Sequence, tok) -> None:
        group = seq.group
        tid = tok.token_id
        seq.append_token(tid)
        self.stats["generated_tokens"] += 1
        if group.params.logprobs:
            seq.logprobs.append(tok)
        params = group.params
        if (tid in self.eos_ids and not params.ignore_eos) or tid in params.stop_token_ids:
            seq.finish_reason = "stop"
            self._finish(seq)
            return
        grammar = seq.grammar
        if grammar is not None:
            grammar.sync(seq.output_ids)
            if grammar.error is not None:
                self._fail(group, f"grammar: {grammar.error}")
                return
        delta = seq.detok.push(tid)
        if delta:
            seq.text += delta
        if group.stop_strings and delta and self._check_stop_strings(seq, len(delta)):
            self._finish(seq)
            return
        if grammar is not None and grammar.stopped:
            # The grammar is complete and allows nothing more: the answer is finished.
            seq.finish_reason = "stop"
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
        release = getattr(self.drafter, "release", None)
        if release is not None:
            release(seq)      # the drafter's own per-sequence state (a draft model's KV)
        group = seq.group
        if group.stream:
            self._emit(seq)
        if group.done:
            for span in group.spans:
                span.release()   # encoder inputs and features are not needed any more
            group.t_done = time.perf_counter()
            group.events.put(("done", None, None, None, None))

    def _fail(self, group: RequestGroup, message: str, *, timed_out: bool = False, stopped: bool = False) -> None:
        if group.error is not None:
            return   # several of its sequences were in the failed batch: one error event
        group.error = message
        group.error_kind = "timeout" if timed_out else "stopped" if stopped else "model"
        for seq in group.seqs:
            if not seq.finished:
                seq.finish_reason = "error"
                seq.status = SeqStatus.FINISHED
                self.scheduler.finish(seq)
        group.events.put(("error", message, group.error_kind, None, None))
