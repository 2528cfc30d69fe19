"""How the ranks of a tensor-parallel model run the same forward.

Rank 0 runs the Runner, the engine and its scheduler as usual; before each forward its
``TPModelRunner`` broadcasts the step (per sequence: new token ids, start position, block
table row, logits rows wanted) to the other ranks, which rebuild the same records and
call the same ``ModelRunner.run``: their sharded layers meet rank 0's in the
collectives, each rank keeping the K/V of its own heads in a pool with the same block ids.
Only rank 0 samples. The step travels as two int64 tensors (a fixed header, then the
payload) on the control group: no pickled objects cross between processes.
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
from mistralrs_core.engine.step import StepRecord

log = logging.getLogger("mistralrs")

OP_STEP, OP_STOP = 1, 2
_HEADER = 4      # op, model index, number of records, payload length

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


def encode_step(records: list[StepRecord]) -> torch.Tensor:
    vals: list[int] = []
    for r in records:
        vals += [len(r.token_ids), r.start, len(r.blocks), r.num_logits]
        vals += r.token_ids
        vals += r.blocks
    return torch.tensor(vals, dtype=torch.int64)


def decode_step(payload: torch.Tensor, n: int) -> list[StepRecord]:
    vals = payload.tolist()
    out, i = [], 0
    for k in range(n):
        nt, start, nb, nl = vals[i:i + 4]
        i += 4
        ids = vals[i:i + nt]
        i += nt
        blocks = vals[i:i + nb]
        i += nb
        out.append(StepRecord(k, ids, start, blocks, num_logits=nl))
    return out


def send(tp: TensorParallel, op: int, index: int, records: list[StepRecord] = ()) -> None:
    global _stopped, _serving
    with _lock:
        _serving = True
        tp.check()
        if _stopped:
            raise DistributedError("tensor parallel: the worker ranks were stopped")
        payload = encode_step(list(records))
        _broadcast(tp, torch.tensor([op, index, len(records), payload.numel()], dtype=torch.int64), "step broadcast")
        if payload.numel():
            _broadcast(tp, payload, "step broadcast")
        if op == OP_STOP:
            _stopped = True


def receive(tp: TensorParallel) -> tuple[int, int, list[StepRecord]]:
    header = torch.empty(_HEADER, dtype=torch.int64)
    _broadcast(tp, header, "waiting for rank 0")
    op, index, n, length = header.tolist()
    records = []
    if length:
        payload = torch.empty(length, dtype=torch.int64)
        _broadcast(tp, payload, "waiting for rank 0")
        records = decode_step(payload, n)
    return op, index, records


class TPModelRunner(ModelRunner):
    """Rank 0's model runner: broadcasts each step, then runs its shard of it."""

    def run(self, records: list[StepRecord]) -> torch.Tensor:
        tp = self.model.tensor_parallel
        for r in records:
            if r.spans or r.positions is not None or r.adapter_id is not None or r.state_slot is not None:
                raise ValueError("tensor parallel: image/audio inputs, model-supplied positions, adapters and "
                                 "per-sequence state are not supported across ranks yet")
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
