"""What tensor parallelism's collectives cost: gloo all-reduce and all-gather latency on
this machine for the activation shapes a decode step and a prefill chunk send, with 2
ranks (processes started here, loopback TCP).

    .venv/bin/python bench/tp_allreduce.py [--world 2] [--iters 200]

A sharded decoder layer does two all-reduces of [tokens, hidden] (after attention and
after the MLP); the embedding one more per step and the LM head one all-gather of
[rows, vocab / world]. Per-step collective cost ~= (2 x layers + 1) x all_reduce +
all_gather.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

SHAPES = [("decode, 1 seq, hidden 2048", (1, 2048)), ("decode, 16 seqs, hidden 2048", (16, 2048)),
          ("decode, 1 seq, hidden 4096", (1, 4096)), ("decode, 16 seqs, hidden 4096", (16, 4096)),
          ("prefill chunk 512, hidden 4096", (512, 4096))]
GATHER = [("logits, 1 row, vocab 128k/2", (1, 64128)), ("logits, 16 rows, vocab 128k/2", (16, 64128))]


def rank_main(rank: int, world: int, port: int, iters: int) -> None:
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = {}
    for name, shape in SHAPES + GATHER:
        x = torch.randn(*shape)
        n = max(10, iters if shape[0] < 64 else iters // 10)
        gather = (name, shape) in GATHER
        parts = [torch.empty_like(x) for _ in range(world)]
        for _ in range(5):
            dist.all_gather(parts, x) if gather else dist.all_reduce(x)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_gather(parts, x) if gather else dist.all_reduce(x)
        out[name] = (time.perf_counter() - t0) / n * 1e6
    if rank == 0:
        print(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--port", type=int)
    a = ap.parse_args()
    if a.rank is not None:
        return rank_main(a.rank, a.world, a.port, a.iters)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(a.world),
                               "--port", str(port), "--iters", str(a.iters)], stdout=subprocess.PIPE, text=True)
             for r in range(a.world)]
    res = json.loads(procs[0].communicate()[0])
    for p in procs[1:]:
        p.wait()
    print(f"gloo, {a.world} ranks on this machine ({os.cpu_count()} cores), microseconds per call:")
    for name, us in res.items():
        print(f"  {name:36s} {us:9.1f} us")


if __name__ == "__main__":
    main()
