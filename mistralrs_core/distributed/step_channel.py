"""How the ranks of a tensor-parallel model run the same forward.

Rank 0 runs the Runner, the engine and its scheduler as usual; before each forward its
``TPModelRunner`` broadcasts the step (per sequence: new token ids, start position, block
table row, logits rows wanted) to the other ranks, which rebuild the same records and
call the same ``ModelRunner.run``: their sharded layers meet rank 0's in the
collectives, each rank keeping the K/V of its own heads in a pool with the same block ids.
Only rank 0 samples. The step travels as two int64 tensors (a fixed header, then the
payload) on the control group: no pickled objects cross between processes.

Image and audio inputs: rank 0 runs the encoders (they are replicated, so one rank's run
is everyone's) and sends, per span a step touches, its place (start, length, bidirectional)
and its feature rows as one more tensor; the other ranks splice exactly those rows.
Model-supplied positions (M-RoPE) travel in the integer payload.
"""
from __future__ import annotations

import atexit
import datetime
import logging
import threading

import torch
import torch.distributed as dist

from mistralrs_core.distributed.state import DistributedError, TensorParallel, current
from mistralrs_core.engine.model_runner import ModelRunner
from mistralrs_core.engine.step import FeatureSpan, StepRecord

log = logging.getLogger("mistralrs")

OP_STEP, OP_STOP = 1, 2
_HEADER = 7      # op, model index, number of records, payload length, feature rows, width, dtype

_lock = threading.Lock()       # one broadcast on the control group at a time (engine threads, exit)
_next_index = 0                # models load in the same order on every rank: the index names one
_workers: dict[int, "WorkerPipeline"] = {}
_stopped = False
_serving = False               # rank 0 sent a step: the other ranks are in their loop


def _broadcast(tp: TensorParallel, t: torch.Tensor, what: str) -> None:
    try:
        if tp.is_driver:
            # gloo's sender waits for each receiver to post its buffer: a rank that hangs
            # while idle would block rank 0 for the control group's long timeout.
            work = dist.broadcast(t, src=0, group=tp.control, async_op=True)
            work.wait(timeout=datetime.timedelta(seconds=tp.timeout_s))
        else:
            dist.broadcast(t, src=0, group=tp.control)
    except RuntimeError as exc:
        raise tp.fail(what, exc) from None


_FEATURE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _touched(r: StepRecord) -> list[FeatureSpan]:
    return [span for _, span, _, _ in r.span_rows()]


def encode_step(records: list[StepRecord]) -> torch.Tensor:
    """Per record: sizes, token ids, block row; then its positions ([axes, n], or axes 0) and
    the spans it touches (start, length, bidirectional), whose features ``step_features``
    sends."""
    vals: list[int] = []
    for r in records:
        vals += [len(r.token_ids), r.start, len(r.blocks), r.num_logits]
        vals += r.token_ids
        vals += r.blocks
        if r.positions is None:
            vals.append(0)
        else:
            vals.append(int(r.positions.shape[0]))
            vals += [int(v) for v in r.positions.reshape(-1)]
        spans = _touched(r)
        vals.append(len(spans))
        for span in spans:
            vals += [span.start, span.length, int(span.bidirectional)]
    return torch.tensor(vals, dtype=torch.int64)


def step_features(records: list[StepRecord]) -> torch.Tensor | None:
    """The features of every span ``encode_step`` listed, in order, as one [rows, width] tensor."""
    feats = [span.features for r in records for span in _touched(r)]
    return torch.cat([f.detach().cpu() for f in feats]) if feats else None


def decode_step(payload: torch.Tensor, n: int) -> list[StepRecord]:
    import numpy as np
    vals = payload.tolist()
    out, i = [], 0
    for k in range(n):
        nt, start, nb, nl = vals[i:i + 4]
        i += 4
        ids = vals[i:i + nt]
        i += nt
        blocks = vals[i:i + nb]
        i += nb
        axes = vals[i]
        i += 1
        positions = None
        if axes:
            positions = np.asarray(vals[i:i + axes * nt], dtype=np.int64).reshape(axes, nt)
            i += axes * nt
        spans = []
        for _ in range(vals[i]):
            s0, length, bidi = vals[i + 1:i + 4]
            spans.append(FeatureSpan(start=s0, length=length, content_hash=b"", bidirectional=bool(bidi)))
            i += 3
        i += 1
        out.append(StepRecord(k, ids, start, blocks, positions=positions, spans=tuple(spans), num_logits=nl))
    return out


def _attach_features(records: list[StepRecord], feats: torch.Tensor) -> None:
    at = 0
    for r in records:
        for span in r.spans:
            span.features = feats[at:at + span.length]
            at += span.length
    if at != feats.shape[0]:
        raise DistributedError(f"tensor parallel: rank 0 sent {feats.shape[0]} feature rows for spans of {at}")


def send(tp: TensorParallel, op: int, index: int, records: list[StepRecord] = ()) -> None:
    global _stopped, _serving
    with _lock:
        _serving = True
        tp.check()
        if _stopped:
            raise DistributedError("tensor parallel: the worker ranks were stopped")
        payload = encode_step(list(records))
        feats = step_features(list(records))
        shape = [0, 0, 0] if feats is None else [feats.shape[0], feats.shape[1], _FEATURE_DTYPES.index(feats.dtype)]
        _broadcast(tp, torch.tensor([op, index, len(records), payload.numel(), *shape], dtype=torch.int64),
                   "step broadcast")
        if payload.numel():
            _broadcast(tp, payload, "step broadcast")
        if feats is not None:
            _broadcast(tp, feats.contiguous(), "step broadcast")
        if op == OP_STOP:
            _stopped = True


def receive(tp: TensorParallel) -> tuple[int, int, list[StepRecord]]:
    header = torch.empty(_HEADER, dtype=torch.int64)
    _broadcast(tp, header, "waiting for rank 0")
    op, index, n, length, rows, width, dtype = header.tolist()
    records = []
    if length:
        payload = torch.empty(length, dtype=torch.int64)
        _broadcast(tp, payload, "waiting for rank 0")
        records = decode_step(payload, n)
    if rows:
        feats = torch.empty(rows, width, dtype=_FEATURE_DTYPES[dtype])
        _broadcast(tp, feats, "waiting for rank 0")
        _attach_features(records, feats)
    return op, index, records


class TPModelRunner(ModelRunner):
    """Rank 0's model runner: broadcasts each step, then runs its shard of it."""

    def run(self, records: list[StepRecord]) -> torch.Tensor:
        tp = self.model.tensor_parallel
        for r in records:
            if r.adapter_id is not None or r.state_slot is not None:
                raise ValueError("tensor parallel: adapters and per-sequence state (cross-attention "
                                 "images, recurrent layers) are not supported across ranks yet")
        # The encoders run here, once: the step carries their rows to the other ranks.
        self._encode_missing(span for r in records for span in _touched(r))
        send(tp, OP_STEP, self.model.tp_index, records)
        return super().run(records)


class WorkerPipeline:
    """What a loader returns on ranks > 0: the shard and its KV pool, no engine."""

    kind = "text"

    def __init__(self, name: str, model, runner: ModelRunner, index: int):
        self.name, self.model, self.runner, self.index = name, model, runner, index

    def shutdown(self) -> None:
        _workers.pop(self.index, None)


def tp_pipeline(model, name: str, num_blocks: int, block_size: int, device, cache_dtype, opts):
    """(num_blocks agreed by all ranks, a ``WorkerPipeline`` on ranks > 0 or None on rank 0)."""
    global _next_index
    tp: TensorParallel = model.tensor_parallel
    if _serving:
        # The other ranks wait in their step loop; a collective for a new model would meet
        # a step broadcast there.
        raise ValueError("tensor parallel: models cannot be added or reloaded once the ranks serve; "
                         "restart the ranks with every model to serve")
    t = torch.tensor([num_blocks], dtype=torch.int64)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.control)
    except RuntimeError as exc:
        raise tp.fail("agreeing on the KV pool size", exc) from None
    num_blocks = int(t.item())
    model.tp_index = _next_index
    _next_index += 1
    if tp.is_driver:
        model.model_runner_cls = TPModelRunner
        if model.tp_index == 0:
            # Whoever forgets stop_workers: the other ranks must not wait forever after we exit.
            atexit.register(stop_workers)
        return num_blocks, None
    runner = ModelRunner(model, num_blocks, block_size, device, cache_dtype, num_state_slots=opts.max_seqs)
    worker = WorkerPipeline(name, model, runner, model.tp_index)
    _workers[model.tp_index] = worker
    return num_blocks, worker


def serve_workers() -> None:
    """On ranks > 0, after the models are loaded: run every step rank 0 broadcasts until it
    stops (``stop_workers``) or a rank dies (``DistributedError``)."""
    tp = current()
    if tp is None or tp.is_driver:
        raise RuntimeError("serve_workers runs on tensor-parallel ranks > 0")
    log.info("tp rank %d: serving %d model(s)", tp.rank, len(_workers))
    with torch.inference_mode():
        while True:
            op, index, records = receive(tp)
            if op == OP_STOP:
                log.info("tp rank %d: stopped by rank 0", tp.rank)
                return
            worker = _workers.get(index)
            if worker is None:
                raise DistributedError(f"tensor parallel: rank 0 sent a step for model {index}, "
                                       f"which rank {tp.rank} has not loaded")
            worker.runner.run(records)


def stop_workers() -> None:
    """On rank 0: tell the other ranks to exit their loop (idempotent)."""
    tp = current()
    if tp is None or not tp.is_driver or _stopped or tp.broken:
        return
    try:
        send(tp, OP_STOP, -1)
    except DistributedError as exc:
        log.warning("%s", exc)
