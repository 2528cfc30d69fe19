"""bf16 dense linears on CPU: oneDNN's packed GEMM against the small-M layers.

    .venv/bin/python bench/dense_matmul.py [--threads 1] [--m 1,2,3,4,8,16,64,256,1024]
                                           [--shapes 3072x512,512x1536,9252x512] [--rounds 5]

Two tables. "step": the 37 matmuls of one Dia decode step (6 decoder layers' q/k/v/o,
MLP in/out, the audio head; [out, in] shapes of the bench model) on 2 rows, per path, in
ms per step and GB/s of weight read (``--threads 2`` for the parallel scaling). "rows": per shape and row count, microseconds per
call of each path. Paths: ``packed`` (``DenseWeight(w)``, today's default), ``small_m``
(``DenseWeight(w, small_m=True)``: the registered small-M kernel up to its row limit, then
``W @ x.T`` on the plain weight), ``kernel avx512``/``kernel avx512bf16`` (the quant
plugin's variants called directly) and ``x @ W.T`` (``F.linear`` on the plain weight).

Times: per-thread CPU time (``time.thread_time``) on 1 thread, wall time otherwise; every
case is timed in several rounds interleaved with the others and the minimum kept (the
machine is shared).
"""
from __future__ import annotations

import argparse
import os
import time

STEP = [(768, 512), (512, 512), (512, 512), (512, 512), (3072, 512), (512, 1536)] * 6 + [(9252, 512)]


def _best(fns: dict, rounds: int, inner: int, clock) -> dict:
    best = {k: float("inf") for k in fns}
    for r in range(rounds):
        # Alternate the order: a path timed right after another one that read different
        # weights finds fewer of its own in the caches.
        for name, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
            fn()
            t = clock()
            for _ in range(inner):
                fn()
            best[name] = min(best[name], (clock() - t) / inner)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--m", default="1,2,3,4,8,16,64,256,1024")
    ap.add_argument("--shapes", default="3072x512,512x1536,9252x512")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    import torch.nn.functional as F

    from mistralrs_core.layers.packed import DenseWeight
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    try:
        from mistralrs_quant.kernels import dense
        variants = [v for v, ok in dense.isa().items() if ok]
    except Exception:   # no quant plugin / no compiler: the torch paths only
        dense, variants = None, []

    torch.manual_seed(0)
    ws = [torch.randn(n, k).bfloat16() * 0.02 for n, k in STEP]
    packed = [DenseWeight(w) for w in ws]
    small = [DenseWeight(w, small_m=True) for w in ws]
    xs = {k: torch.randn(2, k).bfloat16() for _, k in STEP}
    # (No "x @ W.T" here: its per-call re-layout of every weight, ~50 MB of temporaries a
    # step, disturbs the caches for whichever path runs next.)
    fns = {"packed": lambda: [d.mm(xs[k]) for d, (_, k) in zip(packed, STEP)],
           "small_m": lambda: [d.mm(xs[k]) for d, (_, k) in zip(small, STEP)]}
    for v in variants:
        fns[f"kernel {v}"] = lambda v=v: [dense.mm(xs[k], w, impl=v) for w, (_, k) in zip(ws, STEP)]
    nbytes = sum(n * k * 2 for n, k in STEP)
    best = _best(fns, args.rounds, 10, clock)
    print(f"\n### step: 37 matmuls, 2 rows, {nbytes / 1e6:.1f} MB of bf16 weights, {args.threads} thread(s)\n")
    print("| path | ms/step | GB/s |\n|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} |")
    del packed, small, ws

    print(f"\n### rows: us per call, {args.threads} thread(s)\n")
    names = ["packed", "small_m", "x @ W.T"] + [f"kernel {v}" for v in variants]
    print("| shape | M | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 2))
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k).bfloat16() * 0.02
        p, s = DenseWeight(w), DenseWeight(w, small_m=True)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k).bfloat16()
            fns = {"packed": lambda: p.mm(x), "small_m": lambda: s.mm(x), "x @ W.T": lambda: F.linear(x, w)}
            for v in variants:
                if m <= 64:     # beyond, the kernel is far off (it is FMA-bound from ~4 rows)
                    fns[f"kernel {v}"] = lambda v=v: dense.mm(x, w, impl=v)
            inner = max(1, min(20, 2000 // m))
            best = _best(fns, args.rounds, inner, clock)
            print(f"| {n}x{k} | {m} | " + " | ".join(f"{best[c] * 1e6:.0f}" if c in best else "-" for c in names)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
