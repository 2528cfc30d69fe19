"""Starting the ranks of a tensor-parallel server.

``mistralrs serve --tp N ...`` on one machine: the command becomes rank 0 and starts ranks
1..N-1 itself, as child processes running the same command line with torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
Under ``torchrun`` (one machine or several, through its rendezvous) that environment is
already set and nothing is started. Every rank loads the model the same way (its shard);
rank 0 serves HTTP, the others run ``serve_workers`` until rank 0 stops them.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys

from mistralrs_core.distributed.state import TensorParallel, init_tensor_parallel

log = logging.getLogger("mistralrs")

_children: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def spawn_local_ranks(tp_size: int, argv: list[str], module: str = "mistralrs_core.cli") -> None:
    """Make this process rank 0 of ``tp_size`` and start the others running
    ``python -m module *argv`` with the same environment plus their rank."""
    port = str(free_port())
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(tp_size),
            "LOCAL_WORLD_SIZE": str(tp_size)}
    for r in range(1, tp_size):
        env = {**os.environ, **base, "RANK": str(r), "LOCAL_RANK": str(r)}
        _children.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env))
    os.environ.update(base, RANK="0", LOCAL_RANK="0")
    atexit.register(_reap_children)


def _reap_children(grace_s: float = 10.0) -> None:
    for p in _children:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.terminate()


def setup(tp_size: int | None, argv: list[str] | None = None, device: str | None = None,
          timeout_s: float | None = None) -> TensorParallel | None:
    """The CLI's entry: join torchrun's group, or start ``tp_size`` local ranks; None when
    running alone. A ``--tp`` that disagrees with torchrun's world size is a ``ValueError``."""
    rank, world = env_world()
    if world > 1:
        if tp_size not in (None, world):
            raise ValueError(f"--tp: {tp_size} disagrees with WORLD_SIZE={world} set by the launcher")
    elif tp_size is not None and tp_size > 1:
        spawn_local_ranks(tp_size, list(sys.argv[1:] if argv is None else argv))
        rank, world = 0, tp_size
    elif tp_size is not None and tp_size < 1:
        raise ValueError(f"--tp: must be >= 1, got {tp_size}")
    if world == 1:
        return None
    return init_tensor_parallel(rank, world, device=device, timeout_s=timeout_s)
