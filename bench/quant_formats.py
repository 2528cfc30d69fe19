"""Decode/prefill matmul time of the ISQ and pre-quantized formats' torch paths (dequantize
then matmul) against a dense float32 weight and the GGUF Q4_0 C++ kernel, one [N, K] weight.

    python bench/quant_formats.py [N K]
"""
import sys
import time

import torch

from mistralrs_quant.formats import T, quantize
from mistralrs_quant.formats.afq import AFQMethod
from mistralrs_quant.formats.f8q8 import F8Q8Method
from mistralrs_quant.formats.fp8 import FP8Method
from mistralrs_quant.formats.hqq import HQQMethod
from mistralrs_quant.qlinear import GGMLQuantMethod

N, K = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (2048, 2048)
w = torch.randn(N, K) * 0.02


def timeit(fn, reps=20):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


methods = {
    "HQQ4": HQQMethod.from_float(w, 4), "HQQ8": HQQMethod.from_float(w, 8),
    "AFQ4": AFQMethod.from_float(w, 4), "AFQ8": AFQMethod.from_float(w, 8),
    "FP8": FP8Method.from_float(w), "F8Q8": F8Q8Method.from_float(w),
    "Q4_0 (GGUF C++)": GGMLQuantMethod(quantize(w, T.Q4_0), T.Q4_0, compute_dtype=torch.float32),
}
for m_rows in (1, 64):
    x = torch.randn(m_rows, K)
    dense = timeit(lambda: torch.nn.functional.linear(x, w))
    print(f"M={m_rows}: dense f32 {dense:.3f} ms")
    for name, m in methods.items():
        t = timeit(lambda: m.forward(x))
        print(f"  {name:16s} {t:8.3f} ms  ({t / dense:5.1f}x dense)")
