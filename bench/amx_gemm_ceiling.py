"""How close the bf16 GEMMs of a vision tower run to this CPU's AMX rate, and whether a
hand-written AMX GEMM gets closer than oneDNN (which torch and transformers both call).

    .venv/bin/python bench/amx_gemm_ceiling.py [--rounds 5] [--rows 577]

One thread. Per round, interleaved (the host's AMX rate moves within minutes, so only
numbers from the same round compare): the AMX unit on registers only (``peak``), the same
products with operands reloaded from L1 (``l1``), and for each CLIP ViT-L/14 linear at one
336 px image (577 rows): torch's ``F.linear`` (oneDNN, weight re-laid out per call),
oneDNN with the weight prepacked once (``mkldnn._linear_pointwise``, what our compiled tower
runs) and ``bench/amx_probe.cpp``'s plain 2 x 2-tile GEMM with and without software
prefetch. TFLOP/s count the 577 real rows (the probe pads to 608). Needs g++ and an AMX CPU.
"""
from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"qkv 1024->3072": (1024, 3072), "out 1024->1024": (1024, 1024),
          "fc1 1024->4096": (1024, 4096), "fc2 4096->1024": (4096, 1024)}
PEAK_ITERS = 2_000_000
FLOP_PER_ITER = 4 * 16 * 16 * 32 * 2


def build() -> ctypes.CDLL:
    src = Path(__file__).with_name("amx_probe.cpp")
    lib = Path(tempfile.mkdtemp()) / "amx_probe.so"
    subprocess.run(["g++", "-O2", "-shared", "-fPIC", "-mamx-tile", "-mamx-bf16", "-mavx512f",
                    str(src), "-o", str(lib)], check=True)
    so = ctypes.CDLL(str(lib))
    for name in ("amx_peak", "amx_l1"):
        getattr(so, name).restype = ctypes.c_double
        getattr(so, name).argtypes = [ctypes.c_int64]
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    so.amx_pack_a.argtypes = so.amx_pack_b.argtypes = [vp, i64, i64, vp]
    so.amx_gemm.argtypes = [vp, vp, vp, i64, i64, i64, ctypes.c_int]
    if so.amx_init() != 0:
        raise SystemExit("the OS refused the AMX tile state (arch_prctl)")
    return so


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


class Case:
    """One linear: x [rows, k] @ w[n, k]^T + b in bf16, four ways."""

    def __init__(self, so, rows: int, k: int, n: int):
        g = torch.Generator().manual_seed(k * 31 + n)
        self.rows, self.k, self.n = rows, k, n
        self.x = torch.randn(rows, k, generator=g).bfloat16()
        self.w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
        self.b = torch.randn(n, generator=g).bfloat16()
        self.packed_w = torch.ops.mkldnn._reorder_linear_weight(self.w, rows)
        mp = -(-rows // 32) * 32
        xp = torch.zeros(mp, k, dtype=torch.bfloat16)
        xp[:rows] = self.x
        self.ap = torch.empty_like(xp)
        self.bp = torch.empty_like(self.w)
        so.amx_pack_a(ptr(xp), mp, k, ptr(self.ap))
        so.amx_pack_b(ptr(self.w), n, k, ptr(self.bp))
        self.c = torch.empty(mp, n)
        self.so, self.mp = so, mp

    def fns(self) -> dict:
        return {
            "torch F.linear": lambda: F.linear(self.x, self.w, self.b),
            "oneDNN prepacked": lambda: torch.ops.mkldnn._linear_pointwise(self.x, self.packed_w, self.b,
                                                                          "none", [], ""),
            "probe": lambda: self.so.amx_gemm(ptr(self.ap), ptr(self.bp), ptr(self.c), self.mp, self.n,
                                              self.k, 0),
            "probe + prefetch": lambda: self.so.amx_gemm(ptr(self.ap), ptr(self.bp), ptr(self.c), self.mp,
                                                         self.n, self.k, 1),
        }

    def check(self) -> float:
        """Max relative difference of the probe from a float32 matmul of the same bf16 values."""
        self.fns()["probe"]()
        ref = self.x.float() @ self.w.float().T
        return float((self.c[:self.rows] - ref).abs().max() / ref.abs().max())


def best_seconds(fn, inner: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(inner):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=577)
    args = ap.parse_args()
    torch.set_num_threads(1)
    so = build()
    cases = {name: Case(so, args.rows, k, n) for name, (k, n) in SHAPES.items()}
    for name, case in cases.items():
        print(f"{name}: probe vs float32 matmul, max relative difference {case.check():.1e}")
    rows = []
    for r in range(args.rounds):
        peak = PEAK_ITERS * FLOP_PER_ITER / so.amx_peak(PEAK_ITERS) / 1e12
        l1 = PEAK_ITERS * FLOP_PER_ITER / so.amx_l1(PEAK_ITERS) / 1e12
        row = {"peak": peak, "l1": l1}
        for name, case in cases.items():
            flop = 2 * case.rows * case.k * case.n
            for how, fn in case.fns().items():
                row[(name, how)] = flop / best_seconds(fn) / 1e12
        rows.append(row)
        print(f"round {r + 1}: AMX on registers {peak:.2f} TFLOP/s, operands from L1 {l1:.2f}", flush=True)
    hows = list(next(iter(cases.values())).fns())
    print(f"\nTFLOP/s at {args.rows} rows, one thread; per round, then the median of the share of that "
          "round's register-only peak")
    print("| linear | " + " | ".join(hows) + " |")
    print("|---|" + "---|" * len(hows))
    for name in cases:
        cells = []
        for how in hows:
            rates = [f"{row[(name, how)]:.2f}" for row in rows]
            shares = sorted(row[(name, how)] / row["peak"] for row in rows)
            cells.append(f"{' / '.join(rates)} ({100 * shares[len(shares) // 2]:.0f}%)")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
