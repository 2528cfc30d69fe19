"""The process's tensor-parallel group: which rank this process is, of how many.

``torch.distributed`` is process-global, so this is too: ``init_tensor_parallel`` (or
``launch.init_from_env`` under torchrun / ``mistralrs serve --tp N``) sets it once, and
model loading shards every text model it builds across the group. Two process groups
are kept: ``group`` for the collectives of a forward (its timeout is how long a step may
wait for a rank before the rank counts as dead) and ``control``, a CPU (gloo) group with
a long timeout on which idle worker ranks wait for the next step.
"""
from __future__ import annotations

import datetime
import logging
import os

import attrs
import torch
import torch.distributed as dist

log = logging.getLogger("mistralrs")

#: seconds a collective may wait for another rank before that rank counts as dead
DEFAULT_TIMEOUT_S = 60.0
# Idle workers wait for the next step on the control group; a quiet server must not kill them.
_IDLE_TIMEOUT = datetime.timedelta(days=30)


class DistributedError(RuntimeError):
    """A rank stopped answering (died, hung, or its network went away)."""


@attrs.define(eq=False)
class TensorParallel:
    rank: int
    world: int
    backend: str
    timeout_s: float
    group: object = None          # compute collectives (NCCL on CUDA, gloo on CPU)
    control: object = None        # gloo, long timeout: step broadcasts to idle workers
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    broken: str | None = None     # set once a collective failed: every later step fails fast

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def fail(self, what: str, exc: BaseException) -> DistributedError:
        """Mark the group dead and return the error to raise (named once, reused after)."""
        if self.broken is None:
            # gloo's first sentence says what happened; the rest is boilerplate.
            detail = (str(exc).splitlines() or [""])[0].split(". This is typically")[0]
            self.broken = (f"tensor parallel: {what} failed, a rank of {self.world} stopped answering "
                           f"(collective timeout {self.timeout_s:g}s or a closed connection: "
                           f"{type(exc).__name__}: {detail}); restart all ranks")
            log.error("%s", self.broken)
        return DistributedError(self.broken)

    def check(self) -> None:
        if self.broken is not None:
            raise DistributedError(self.broken)


_TP: TensorParallel | None = None


def current() -> TensorParallel | None:
    """The active tensor-parallel group, or None (one process holds the whole model)."""
    return _TP


def init_tensor_parallel(rank: int, world: int, *, backend: str | None = None, device: str | None = None,
                         init_method: str | None = None, timeout_s: float | None = None) -> TensorParallel | None:
    """Join (or create) the default process group and make it this process's TP group.
    ``world == 1`` is plain single-process serving (returns None). ``backend``: "gloo"
    (CPU) or "nccl" (CUDA); default from ``device``. ``init_method``: default ``env://``
    (MASTER_ADDR / MASTER_PORT, as torchrun sets them)."""
    global _TP
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"tp: rank {rank} outside a world of {world}")
    if world == 1:
        return None
    if _TP is not None:
        if (_TP.rank, _TP.world) != (rank, world):
            raise ValueError(f"tp: already initialised as rank {_TP.rank} of {_TP.world}")
        return _TP
    if timeout_s is None:
        timeout_s = float(os.environ.get("MISTRALRS_TP_TIMEOUT", DEFAULT_TIMEOUT_S))
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = torch.device("cuda", local % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                                timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    _TP = TensorParallel(rank, world, backend, timeout_s, group=dist.group.WORLD, control=control, device=dev)
    log.info("tensor parallel: rank %d of %d (%s on %s, collective timeout %gs)", rank, world, backend, dev, timeout_s)
    return _TP


def shutdown_tensor_parallel() -> None:
    """Leave the group (tests, orderly exit)."""
    global _TP
    _TP = None
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:   # a dead peer: nothing left to tear down cleanly
            pass
