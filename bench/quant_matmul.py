"""Quantized matmul paths of mistralrs_quant on this CPU.

    .venv/bin/python bench/quant_matmul.py [--threads 2] [--types Q4_0,Q4_1,...] [--m 1,16,512]

For each weight shape [out, in] (SmolLM2-135M's 576x1536 and 1536x576, Gemma-3-270M's
640x2048), ggml type, compute dtype and execution path, it times ``forward`` on M rows
and prints a markdown table: microseconds per call (minimum over repeats, the machine is
shared), rows ("tokens") per second, and effective GB/s = bytes of the ggml-format weight
per call / time. Dense bf16/f32 matmuls on the same shape are the yardstick.
"""
from __future__ import annotations

import argparse
import time

import torch
from gguf import GGMLQuantizationType as T

from mistralrs_quant.formats import GGML_TYPES
from mistralrs_quant.qlinear import GGMLQuantMethod

SHAPES = [(576, 1536), (1536, 576), (640, 2048)]


def best_time(fn, min_reps=5, budget_s=0.25, max_reps=500) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def variants(raw, qtype):
    """(label, method) for every path of both compute dtypes."""
    out = []
    bf = GGMLQuantMethod(raw, qtype, compute_dtype=torch.bfloat16, dense=False)
    for path in bf.available_paths():
        out.append((f"bf16 {path}", bf, path))
    out.append(("bf16 dense", GGMLQuantMethod(raw, qtype, compute_dtype=torch.bfloat16, dense=True), "dense"))
    f32 = GGMLQuantMethod(raw, qtype, compute_dtype=torch.float32)
    out.append(("f32 dequant", f32, "dequant"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--types", default="Q4_0,Q4_1,Q4_K,Q5_0,Q6_K,Q8_0")
    ap.add_argument("--m", default="1,16,512")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ms = [int(m) for m in args.m.split(",")]
    torch.manual_seed(0)
    print(f"threads={args.threads}  torch={torch.__version__}\n")
    print("| weight [out,in] | type | path | M | µs/call | tokens/s | GB/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f) * 0.02
        for m in ms:
            x = torch.randn(m, in_f)
            for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "f32")):
                dense, xd = w.to(dtype), x.to(dtype)
                s = best_time(lambda: torch.nn.functional.linear(xd, dense))
                print(f"| {out_f}x{in_f} | dense {label} | matmul | {m} | {s * 1e6:.0f} | {m / s:,.0f} "
                      f"| {dense.nbytes / s / 1e9:.1f} |")
        for name in args.types.split(","):
            qtype = T[name]
            spec = GGML_TYPES[int(qtype)]
            raw = spec.quantize(w) if spec.quantize else None
            if raw is None:
                continue
            for label, method, path in variants(raw, qtype):
                for m in ms:
                    x = torch.randn(m, in_f)
                    s = best_time(lambda: method.forward(x, path))
                    print(f"| {out_f}x{in_f} | {name} | {label} | {m} | {s * 1e6:.0f} | {m / s:,.0f} "
                          f"| {raw.nbytes / s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
