"""The small-M dense matmul (``csrc/dense_small_m*.cpp``) as the core's dense kernel.

``mm(x, w, bias, act, other, impl)`` computes ``act(x @ w.T + bias) + other`` for bf16 or
f16 ``w`` [N, K] (plain rows) and x [M, K] of that dtype: float32 sums, the epilogue in
float32, one rounding to the weight dtype. Each output is therefore the exactly rounded
value of its float32 result, whose error is float32 summation error (the bf16 products are
exact in float32). Variants (``impl``): ``amx`` (AMX tiles on the plain weight rows,
bf16 only), ``avx512bf16`` (vdpbf16ps, bf16 only), ``avx512`` (weights widened to float32,
FMA), ``scalar``; ``auto`` picks the fastest this CPU has for the row count (measured on a
Sapphire Rapids core, ``bench/dense_matmul.py``: vdpbf16ps for 1-2 rows, widening for 3,
AMX from 4). vdpbf16ps and AMX treat bf16 subnormals as zero. At 1-2 rows the AVX-512
variants stream the weights ~20-35% faster than oneDNN's packed GEMM; for 4-16 rows AMX is
within ~15% of it, either way, depending on the shape. ``kernel`` (``DenseKernel``) is what the plugin registers; it
supports a CPU with AVX-512 (without it, the scalar loop would lose to oneDNN).
"""
from __future__ import annotations

import ctypes

import torch

from . import cpp

IMPLS = {"auto": 0, "scalar": 1, "avx512": 2, "avx512bf16": 3, "amx": 4}
_WTYPE = {torch.bfloat16: 0, torch.float16: 1}
_ACTS = {None: 0, "gelu_tanh": 1}
# Rows up to which the kernel is at least as fast as oneDNN's packed GEMM. The AVX-512
# variants stream W once for all rows but spend a multiply per weight and row, so from ~4
# rows on they are bound by the FMA units; AMX tiles are not, up to one 16-row tile of
# activations (measured: docs/architecture.md, "Small-M dense kernel").
MAX_ROWS = 4
MAX_ROWS_AMX = 16


class _Lib:
    fn = None
    isa = None


def _fn():
    if _Lib.fn is None:
        lib = cpp._lib()
        i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.mq_dense_isa.restype = ci
        lib.mq_dense_isa.argtypes = []
        f = lib.mq_dense_mm
        f.restype = ci
        f.argtypes = [ci, ci, vp, i64, i64, i64, vp, i64, i64, vp, ci, vp, i64, vp, i64]
        _Lib.isa = lib.mq_dense_isa()
        _Lib.fn = f
    return _Lib.fn


def isa() -> dict:
    """Which variants this CPU (and OS) runs: ``{"avx512": bool, "avx512bf16": bool, "amx": bool}``."""
    _fn()
    return {"avx512": bool(_Lib.isa & 1), "avx512bf16": bool(_Lib.isa & 2), "amx": bool(_Lib.isa & 4)}


def _weight_type(w: torch.Tensor) -> int:
    wtype = _WTYPE.get(w.dtype)
    if wtype is None or w.dim() != 2 or w.device.type != "cpu":
        raise ValueError(f"w must be a 2-D bf16/f16 CPU tensor, got {w.dtype} {tuple(w.shape)} on {w.device}")
    return wtype


def mm(x2d: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None,
       other: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """``act(x2d @ w.T + bias) + other`` in ``w.dtype`` (see the module docstring)."""
    wtype = _weight_type(w)
    if act not in _ACTS:
        raise ValueError(f"act: {act!r} is not one of {sorted(_ACTS, key=str)}")
    n, k = w.shape
    if w.stride(1) != 1 and k > 1:
        w = w.contiguous()
    if x2d.dim() != 2 or x2d.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x2d.shape)}")
    if x2d.dtype != w.dtype or (x2d.stride(1) != 1 and k > 1):
        x2d = x2d.to(w.dtype).contiguous()
    m = x2d.shape[0]
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must be [{n}], got {tuple(bias.shape)}")
        bias = bias.to(w.dtype).contiguous()
    so = 0
    if other is not None:
        if other.shape != (m, n):
            raise ValueError(f"other must be [{m}, {n}], got {tuple(other.shape)}")
        if other.dtype != w.dtype or (other.stride(1) != 1 and n > 1):
            other = other.to(w.dtype).contiguous()
        so = other.stride(0)
    y = torch.empty(m, n, dtype=w.dtype)
    rc = _fn()(wtype, IMPLS[impl], x2d.data_ptr(), m, k, x2d.stride(0), w.data_ptr(), n, w.stride(0),
               None if bias is None else bias.data_ptr(), _ACTS[act],
               None if other is None else other.data_ptr(), so, y.data_ptr(), n)
    if rc:
        raise RuntimeError(f"mq_dense_mm failed ({cpp._ERRORS.get(rc, rc)}; impl {impl!r}, {w.dtype})")
    return y


class _Bound:
    """``mm`` for one weight, with its checks and pointers done once: a decode step calls
    it for every layer."""

    __slots__ = ("w", "dtype", "wtype", "n", "k", "wp", "fn")

    def __init__(self, w: torch.Tensor):
        self.wtype = _weight_type(w)
        self.w = w.contiguous()
        self.dtype = w.dtype
        self.n, self.k = w.shape
        self.wp = self.w.data_ptr()
        self.fn = _fn()

    def __call__(self, x2d, bias=None, act=None, other=None):
        if x2d.dtype != self.dtype or x2d.stride(-1) != 1 or x2d.dim() != 2 or x2d.shape[1] != self.k:
            return mm(x2d, self.w, bias, act, other)
        m, n = x2d.shape[0], self.n
        so = 0
        if bias is not None and (bias.dtype != self.dtype or bias.shape != (n,) or bias.stride(0) != 1):
            return mm(x2d, self.w, bias, act, other)
        if other is not None:
            if other.dtype != self.dtype or other.shape != (m, n) or other.stride(-1) != 1:
                return mm(x2d, self.w, bias, act, other)
            so = other.stride(0)
        y = torch.empty((m, n), dtype=self.dtype)
        rc = self.fn(self.wtype, 0, x2d.data_ptr(), m, self.k, x2d.stride(0), self.wp, n, self.k,
                     None if bias is None else bias.data_ptr(), _ACTS[act],
                     None if other is None else other.data_ptr(), so, y.data_ptr(), n)
        if rc:
            raise RuntimeError(f"mq_dense_mm failed ({cpp._ERRORS.get(rc, rc)}, {self.dtype})")
        return y


class CppDenseKernel:
    """The ``DenseKernel`` the plugin registers (``mistralrs_core.layers.dense_kernels``)."""

    def supports(self, dtype: torch.dtype, device) -> bool:
        if torch.device(device).type != "cpu" or dtype not in _WTYPE or not cpp.available():
            return False
        return isa()["avx512"]

    def max_rows(self, dtype: torch.dtype) -> int:
        return MAX_ROWS_AMX if dtype == torch.bfloat16 and isa()["amx"] else MAX_ROWS

    def bind(self, w: torch.Tensor) -> _Bound:
        return _Bound(w)


kernel = CppDenseKernel()
