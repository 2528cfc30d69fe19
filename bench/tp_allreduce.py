"""What tensor parallelism's collectives cost: gloo all-reduce and all-gather latency on
this machine for the activation shapes a decode step and a prefill chunk send, with 2
ranks (processes started here, loopback TCP).

    .venv/bin/python bench/tp_allreduce.py [--world 2] [--iters 200]
    .venv/bin/python bench/tp_allreduce.py --step     # + decode steps of a random Llama, 1 vs 2 ranks

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
from pathlib import Path

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


def step_main(rank: int, world: int, port: int, model_dir: str, steps: int = 20) -> None:
    """Mean time of a 4-sequence decode step (ModelRunner.run) and of its collectives."""
    import torch
    from mistralrs_core.distributed import init_tensor_parallel, placement, tp as tpmod
    from mistralrs_core.engine.model_runner import ModelRunner
    from mistralrs_core.engine.step import StepRecord
    from mistralrs_core.testing.parity import load_for_test
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        init_tensor_parallel(rank, world, device="cpu")
    model = load_for_test(model_dir)
    placement.finish_model(model)
    spent = [0.0]
    real = tpmod.all_reduce, tpmod.all_gather_last

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return wrapper
    tpmod.all_reduce, tpmod.all_gather_last = timed(real[0]), timed(real[1])
    runner = ModelRunner(model, 64, 16, "cpu", torch.float32)
    recs = [StepRecord(i, [5 + i] * 32, 0, list(range(i * 16, i * 16 + 16))) for i in range(4)]
    runner.run(recs)
    pos = 32
    t0 = None
    for s in range(steps + 3):
        if s == 3:
            t0, spent[0] = time.perf_counter(), 0.0
        runner.run([StepRecord(i, [7], pos, list(range(i * 16, i * 16 + 16))) for i in range(4)])
        pos += 1
    total = (time.perf_counter() - t0) / steps * 1e3
    if rank == 0:
        print(json.dumps({"world": world, "step_ms": total, "collectives_ms": spent[0] / steps * 1e3}))


def run_steps(world: int) -> dict:
    import tempfile
    from mistralrs_core.testing.tiny import write_random_llama
    d = Path(tempfile.gettempdir()) / "mistralrs_tp_bench_llama"
    if not (d / "model.safetensors").exists():
        write_random_llama(d, hidden=1024, layers=8, heads=16, kv_heads=8, intermediate=2816, vocab=8192)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "--step-rank", str(r), "--world", str(world),
                               "--port", str(port), "--model-dir", str(d)], stdout=subprocess.PIPE, text=True)
             for r in range(world)]
    res = json.loads(procs[0].communicate()[0])
    for p in procs[1:]:
        p.wait()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--port", type=int)
    ap.add_argument("--step", action="store_true")
    ap.add_argument("--step-rank", type=int)
    ap.add_argument("--model-dir")
    a = ap.parse_args()
    if a.rank is not None:
        return rank_main(a.rank, a.world, a.port, a.iters)
    if a.step_rank is not None:
        return step_main(a.step_rank, a.world, a.port, a.model_dir)
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
    if a.step:
        print("decode step, 4 sequences, random Llama 1024 x 8 layers (16 heads / 8 KV), vocab 8192, float32:")
        for world in (1, a.world):
            r = run_steps(world)
            print(f"  {world} rank(s): {r['step_ms']:7.1f} ms per step, of which collectives {r['collectives_ms']:6.1f} ms")


if __name__ == "__main__":
    main()
