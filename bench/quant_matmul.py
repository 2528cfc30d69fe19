"""Quantized matmul paths of mistralrs_quant on this CPU.

    .venv/bin/python bench/quant_matmul.py [--threads 2] [--types Q4_0,Q4_1,...] [--m 1,16,512]
                                           [--shapes 576x1536,1536x576,640x2048] [--rounds 3]

For each weight shape [out, in] (SmolLM2-135M's 576x1536 and 1536x576, Gemma-3-270M's
640x2048), ggml type, compute dtype and execution path, it times ``forward`` on M rows
(``f32 cpp``: the C++ kernels, float32-exact; ``bf16 dequant (C++ tiles)``: the large-M
path when they are available; MISTRALRS_QUANT_NO_CPP=1 shows the torch-only defaults)
and prints a markdown table: microseconds per call, rows ("tokens") per second, and
effective GB/s = bytes of the ggml-format weight / time per call. Dense bf16/f32 matmuls
on the same shape are the yardstick (their GB/s counts their own dense bytes).

The machine is shared: every case is timed in several rounds spread over the run and
the minimum kept, which is the best estimate of its uncontended time.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from gguf import GGMLQuantizationType as T

from mistralrs_quant.formats import GGML_TYPES
from mistralrs_quant.kernels import cpp as cpp_kernels
from mistralrs_quant.qlinear import GGMLQuantMethod

SHAPES = [(576, 1536), (1536, 576), (640, 2048)]


def best_time(fn, min_reps=3, budget_s=0.08, max_reps=200) -> float:
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def cases(shapes: list[tuple[int, int]], types: list[str], ms: list[int]):
    """Yields (shape, type label, path label, M, bytes per call, fn)."""
    torch.manual_seed(0)
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f) * 0.02
        xs = {m: torch.randn(m, in_f) for m in ms}
        for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
            dense = w.to(dtype)
            for m in ms:
                xd = xs[m].to(dtype)
                yield (out_f, in_f), f"dense {label}", "matmul", m, dense.nbytes, \
                    (lambda xd=xd, dense=dense: torch.nn.functional.linear(xd, dense))
        for name in types:
            qtype = T[name]
            spec = GGML_TYPES[int(qtype)]
            if spec.quantize is None or in_f % spec.block_size:
                continue
            raw = spec.quantize(w)
            methods = []
            torch_only = GGMLQuantMethod(raw, qtype, compute_dtype=torch.bfloat16, dense=False, cpp=False)
            methods += [(f"bf16 {p}", torch_only, p) for p in torch_only.available_paths() if p != "dequant"]
            methods.append(("bf16 dequant (torch)", torch_only, "dequant"))
            if cpp_kernels.available() and cpp_kernels.supports(qtype):
                with_cpp = GGMLQuantMethod(raw, qtype, compute_dtype=torch.bfloat16, cpp=True)
                methods.append(("f32 cpp", with_cpp, "cpp"))
                methods.append(("bf16 dequant (C++ tiles)", with_cpp, "dequant"))
            methods.append(("bf16 dense", GGMLQuantMethod(raw, qtype, compute_dtype=torch.bfloat16, dense=True),
                            "dense"))
            methods.append(("f32 dequant", GGMLQuantMethod(raw, qtype, compute_dtype=torch.float32), "dequant"))
            auto = GGMLQuantMethod(raw, qtype, compute_dtype=torch.bfloat16)
            for label, method, path in methods:
                for m in ms:
                    yield (out_f, in_f), name, label, m, raw.nbytes, \
                        (lambda x=xs[m], method=method, path=path: method.forward(x, path))
            for m in ms:
                yield (out_f, in_f), name, f"bf16 auto→{auto.choose_path(m)}", m, raw.nbytes, \
                    (lambda x=xs[m], auto=auto: auto.forward(x))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--types", default="Q4_0,Q4_1,Q4_K,Q5_0,Q6_K,Q8_0")
    ap.add_argument("--m", default="1,16,512")
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ms = [int(m) for m in args.m.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    table = list(cases(shapes, args.types.split(","), ms))
    best = [float("inf")] * len(table)
    load0 = os.getloadavg()[0]
    for _ in range(args.rounds):
        for i, case in enumerate(table):
            case[-1]()  # warm-up
            best[i] = min(best[i], best_time(case[-1]))
    info = cpp_kernels.build_info() if cpp_kernels.available() else {"unavailable": cpp_kernels.unavailable_reason()}
    print(f"threads={args.threads}  torch={torch.__version__}  load average {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}  C++ kernels: {info}\n")
    print("| weight [out,in] | type | path | M | µs/call | tokens/s | GB/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for (shape, name, label, m, nbytes, _), s in zip(table, best):
        print(f"| {shape[0]}x{shape[1]} | {name} | {label} | {m} | {s * 1e6:.0f} | {m / s:,.0f} "
              f"| {nbytes / s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
