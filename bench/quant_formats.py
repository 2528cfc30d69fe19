"""Decode (M=1) and prefill (M=64) matmul time of the ISQ and pre-quantized formats on one
[N, K] weight: each format's ``forward`` (the C++ kernels of kernels/qformats.py for
F8Q8/FP8/HQQ on CPU) against its torch path (``forward_torch``: dequantize, then
F.linear), a dense float32 and a dense bfloat16 matmul, and the GGUF Q4_0 C++ kernel.

    python bench/quant_formats.py [N K] [--threads T]

Each time is the best of ``REPS`` calls (wall) and the mean CPU time per call
(``time.process_time``, all threads): on a shared, noisy machine the best wall time and
the CPU time are what to compare; ratios are within one run.
"""
import argparse
import time

import torch

from mistralrs_quant.formats import T, quantize
from mistralrs_quant.formats.afq import AFQMethod
from mistralrs_quant.formats.f8q8 import F8Q8Method
from mistralrs_quant.formats.fp8 import FP8Method
from mistralrs_quant.formats.hqq import HQQMethod
from mistralrs_quant.kernels import cpp
from mistralrs_quant.qlinear import GGMLQuantMethod

REPS = 15

ap = argparse.ArgumentParser()
ap.add_argument("shape", nargs="*", type=int, default=[2048, 2048])
ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
args = ap.parse_args()
N, K = args.shape
if args.threads:
    torch.set_num_threads(args.threads)
torch.manual_seed(0)
w = torch.randn(N, K) * 0.02
w_bf16 = w.to(torch.bfloat16)


def timeit(fn):
    """(best wall ms, mean CPU ms) over REPS calls after a warm-up."""
    fn()
    best, cpu0 = float("inf"), time.process_time()
    for _ in range(REPS):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3, (time.process_time() - cpu0) / REPS * 1e3


def fp8_block(weight):
    """DeepSeek-V3-style checkpoint layout: fp8 codes with 128x128 block scales."""
    blocks = weight.reshape(N // 128, 128, K // 128, 128)
    s = blocks.abs().amax((1, 3)) / 448.0
    q = (blocks / s[:, None, :, None]).reshape(N, K).to(torch.float8_e4m3fn)
    return FP8Method(q, s, (128, 128))


methods = {
    "F8Q8": F8Q8Method.from_float(w), "FP8": FP8Method.from_float(w), "FP8 128x128": fp8_block(w),
    "HQQ4": HQQMethod.from_float(w, 4), "HQQ8": HQQMethod.from_float(w, 8),
    "AFQ4": AFQMethod.from_float(w, 4), "AFQ8": AFQMethod.from_float(w, 8),
}
q4_0 = GGMLQuantMethod(quantize(w, T.Q4_0), T.Q4_0, compute_dtype=torch.float32)
print(f"weight {N}x{K}, {torch.get_num_threads()} threads, C++ kernels: "
      f"{cpp.build_info().get('isa') if cpp.available() else cpp.unavailable_reason()}")
print("times: best wall ms / mean CPU ms per call; ratios on wall")
for m_rows in (1, 64):
    x = torch.randn(m_rows, K)
    xb = x.to(torch.bfloat16)
    d32 = timeit(lambda: torch.nn.functional.linear(x, w))
    d16 = timeit(lambda: torch.nn.functional.linear(xb, w_bf16))
    print(f"\nM={m_rows}: dense f32 {d32[0]:.3f}/{d32[1]:.3f}  dense bf16 {d16[0]:.3f}/{d16[1]:.3f}  "
          f"Q4_0 (GGUF C++) {timeit(lambda: q4_0.forward(x))[0]:.3f}")
    print(f"  {'format':12s} {'forward':>15s} {'torch path':>15s} {'torch/fwd':>9s} {'fwd/f32':>8s} {'fwd/bf16':>8s}")
    for name, m in methods.items():
        fwd = timeit(lambda: m.forward(x))
        torch_path = timeit(lambda: m.forward_torch(x)) if hasattr(m, "forward_torch") else fwd
        print(f"  {name:12s} {fwd[0]:7.3f}/{fwd[1]:7.3f} {torch_path[0]:7.3f}/{torch_path[1]:7.3f} "
              f"{torch_path[0] / fwd[0]:8.1f}x {fwd[0] / d32[0]:7.2f}x {fwd[0] / d16[0]:7.2f}x")
    for name in ("F8Q8", "HQQ4"):
        m = methods[name]
        fwd = timeit(lambda: m.forward(xb))
        print(f"  {name + ' bf16 x':12s} {fwd[0]:7.3f}/{fwd[1]:7.3f} {'':15s} {'':9s} {fwd[0] / d32[0]:7.2f}x "
              f"{fwd[0] / d16[0]:7.2f}x")

# Tensor-parallel HQQ shards (formats/hqq.py HQQShard): a rank's half of the layer against
# what a shard did before (dequantize the whole layer, slice, multiply), same run.
h = methods["HQQ4"]
idx_half = torch.arange(N // 2)
odd = [(0, N // 2 - 8)]                         # not whole bands of rows: runs the whole layer
shards = {"rows 0:N/2": (h.take_rows([(0, N // 2)]), lambda w: w[idx_half], K),
          "cols K/2:K": (h.take_cols(K // 2, K), lambda w: w[:, K // 2:], K - K // 2),
          "rows 0:N/2-8": (h.take_rows(odd), lambda w: w[:N // 2 - 8], K)}
print(f"\nHQQ4 tensor-parallel shard forward (best wall ms / mean CPU ms): kernel over the shard "
      f"vs dequantize-all-and-slice")
for m_rows in (1, 64):
    for name, (shard, part, k_in) in shards.items():
        x = torch.randn(m_rows, k_in)
        new = timeit(lambda: shard.forward(x))
        old = timeit(lambda: torch.nn.functional.linear(x, part(h.dequantize())))
        kind = "own layer" if shard.local is not None else "whole layer"
        print(f"  M={m_rows:<3d} {name:13s} ({kind:11s}) {new[0]:7.3f}/{new[1]:7.3f}  old {old[0]:7.3f}/{old[1]:7.3f}"
              f"  {old[1] / new[1]:5.1f}x CPU")
