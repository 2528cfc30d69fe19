"""C++ CPU kernels for the F8Q8, FP8 (per tensor and block-scaled) and HQQ (4/8-bit) weights.

The torch paths of these formats (``formats/f8q8.py``, ``fp8.py``, ``hqq.py``) build the
whole float32 weight on every call and then run ``F.linear``: 2.5-8x a dense matmul. The
kernels here (``csrc/qformats_*.cpp``, in the same library as the ggml kernels, same
runtime AVX-512/scalar choice, same thread pool) stream the packed codes once per call:

``mm``          M <= ``FUSED_MAX_M``: tiles of ~32 KiB of weight rows decoded to float32 in
                cache and multiplied in at once (float32 FMAs).
``dequant_mm``  larger M (prefill): tiles of rows decoded in parallel into one reused
                buffer (float32, or bfloat16 for bfloat16 activations), each multiplied by
                ``torch.mm``, so the BLAS/AMX kernels amortise the decode.

Decoded values are those of the torch path: bit-identical for F8Q8 and FP8 (for
per-tensor FP8 the scale multiplies the product, as the torch path does); HQQ's
``q·s + (−z·s)`` is one FMA, as torch's ``addcmul`` computes it on AVX CPUs (the scalar
fallback rounds twice: within an ulp). Outputs differ from the torch path only by
summation order (float32) — for bfloat16/float16 activations the fused path computes in
float32 and rounds the result once, where the torch path multiplies in that dtype.

Variants (``IMPLS``), chosen at run time by a CPU check: AVX-512 intrinsics, the portable
loops compiled for AVX2/FMA, or those loops for the baseline ISA.

``MISTRALRS_QUANT_NO_CPP=1`` (read when a layer first runs) keeps the torch paths, as for
the ggml kernels; so does a build failure, a non-CPU weight or a shape the kernels do not
take.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

from . import cpp

# Largest M for the fused decode-and-dot path; above it dequant_mm's BLAS wins: from
# float32 activations at M = 32 (float32 tiles), from bfloat16 ones at M = 16 (bf16 tiles,
# AMX); measured on 2048 x 2048 weights, one thread (bench/quant_formats.py).
FUSED_MAX_M = 16
FUSED_MAX_M_BF16 = 8
# Decoded tiles of at most this many weights for dequant_mm.
_TILE_ELEMS = 1 << 20

F8Q8, FP8, FP8_BLOCK, HQQ4, HQQ8 = 1, 2, 3, 4, 5
# Variants: "auto" is the widest this CPU runs (AVX-512, else AVX2/FMA, else scalar).
IMPLS = {"auto": 0, "scalar": 1, "avx512": 2, "avx2": 4}
_ERRORS = {1: "bad weight description", 2: "unknown implementation", 3: "this CPU lacks the instructions",
           5: "kernel raised an exception"}


class _Fmt(ctypes.Structure):
    """``FmtWeight`` in csrc/qformats.h."""
    _fields_ = [("kind", ctypes.c_int32), ("impl", ctypes.c_int32), ("w", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("aux", ctypes.c_void_p), ("N", ctypes.c_int64),
                ("K", ctypes.c_int64), ("br", ctypes.c_int64), ("bc", ctypes.c_int64),
                ("tensor_scale", ctypes.c_float)]


def _check(rc: int) -> None:
    if rc:
        raise RuntimeError(f"mistralrs_quant format kernel: {_ERRORS.get(rc, f'error {rc}')}")


def _cpu_contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(dtype).contiguous()


class FormatKernel:
    """One weight [N, K] bound to the kernels; keeps its tensors alive."""

    def __init__(self, kind: int, w: torch.Tensor, n: int, k: int, *, scale: Optional[torch.Tensor] = None,
                 aux: Optional[torch.Tensor] = None, br: int = 0, bc: int = 0, tensor_scale: float = 1.0,
                 impl: str = "auto"):
        self.lib = cpp._lib()
        self.kind, self.n, self.k = kind, int(n), int(k)
        self.tensors = (w, scale, aux)
        self.tensor_scale = float(tensor_scale)
        self.desc = _Fmt(kind, IMPLS[impl], w.data_ptr(), scale.data_ptr() if scale is not None else None,
                         aux.data_ptr() if aux is not None else None, self.n, self.k, int(br), int(bc),
                         self.tensor_scale)
        self._ref = ctypes.byref(self.desc)
        self._args = dict(scale=scale, aux=aux, br=br, bc=bc, tensor_scale=tensor_scale)

    def with_impl(self, impl: str) -> "FormatKernel":
        """The same weight on another variant ("scalar" forces the portable code)."""
        return FormatKernel(self.kind, self.tensors[0], self.n, self.k, impl=impl, **self._args)

    def mm(self, x2d: torch.Tensor) -> torch.Tensor:
        """float32 ``x2d @ W.T`` through the fused decode-and-dot kernel."""
        if x2d.dtype != torch.float32 or not x2d.is_contiguous():
            x2d = x2d.to(torch.float32).contiguous()
        y = torch.empty(x2d.shape[0], self.n, dtype=torch.float32)
        if x2d.shape[0] and self.n:
            _check(self.lib.mq_fmt_matmul(self._ref, x2d.data_ptr(), x2d.shape[0], y.data_ptr()))
        return y

    def dequantize_rows(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [r0, r1) into ``out`` (float32 or bfloat16, contiguous [r1 - r0, K]); for
        per-tensor FP8 the codes' values, unscaled."""
        if r1 > r0:
            _check(self.lib.mq_fmt_dequantize(self._ref, r0, r1, out.data_ptr(), int(out.dtype == torch.bfloat16)))
        return out

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, scale included (what the torch path's ``dequantize`` gives)."""
        w = self.dequantize_rows(0, self.n, torch.empty(self.n, self.k, dtype=torch.float32))
        return w * self.tensor_scale if self.kind == FP8 else w

    def dequant_mm(self, x2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x2d @ W.T`` in ``dtype`` (float32 or bfloat16) through decoded tiles of W."""
        x2d = x2d.to(dtype).contiguous()
        step = max(1, min(self.n, _TILE_ELEMS // max(1, self.k)))
        buf = cpp._scratch(step * self.k, dtype)
        out = torch.empty(x2d.shape[0], self.n, dtype=dtype)
        for r0 in range(0, self.n, step):
            rows = min(step, self.n - r0)
            w = self.dequantize_rows(r0, r0 + rows, buf[:rows * self.k].view(rows, self.k))
            if rows == self.n:
                torch.mm(x2d, w.t(), out=out)
            else:
                torch.mm(x2d, w.t(), out=out[:, r0:r0 + rows])
        if self.kind == FP8:
            out.mul_(torch.tensor(self.tensor_scale, dtype=torch.float32).to(dtype))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., K] -> [..., N] in ``x``'s dtype."""
        if x.shape[-1] != self.k:
            raise ValueError(f"input has {x.shape[-1]} features, the weight expects {self.k}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.k)
        if x2d.shape[0] <= (FUSED_MAX_M_BF16 if x.dtype == torch.bfloat16 else FUSED_MAX_M):
            y = self.mm(x2d)
        else:
            y = self.dequant_mm(x2d, torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
        return y.to(x.dtype).reshape(*lead, self.n)


def variants() -> list[str]:
    """The variants this CPU runs (besides "auto")."""
    bits = cpp._lib().mq_fmt_isa()
    return ["scalar"] + (["avx2"] if bits & 2 else []) + (["avx512"] if bits & 1 else [])


_UNBOUND = object()


def cached(owner, bind) -> Optional[FormatKernel]:
    """``owner``'s kernel, bound by ``bind()`` on first use (None: use the torch path)."""
    k = getattr(owner, "_cpu_kernel", _UNBOUND)
    if k is _UNBOUND:
        k = bind()
        owner._cpu_kernel = k
    return k


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors) and cpp.available()


def bind_f8q8(blocks: torch.Tensor, n: int, k: int) -> Optional[FormatKernel]:
    """``blocks`` [N, K / 32, 33] uint8 (F8Q8Method.blocks)."""
    if not _usable(blocks) or k % 32:
        return None
    return FormatKernel(F8Q8, _cpu_contiguous(blocks, torch.uint8), n, k)


def bind_fp8(weight: torch.Tensor, dequant_scale: torch.Tensor,
             block: Optional[tuple[int, int]]) -> Optional[FormatKernel]:
    """``weight`` [N, K] float8_e4m3fn; ``dequant_scale`` one float (per tensor) or
    [ceil(N / br), ceil(K / bc)] (blocks ``(br, bc)``)."""
    if not _usable(weight, dequant_scale):
        return None
    n, k = weight.shape
    codes = _cpu_contiguous(weight, torch.float8_e4m3fn).view(torch.uint8)
    if block is None:
        return FormatKernel(FP8, codes, n, k, tensor_scale=float(dequant_scale.reshape(())))
    return FormatKernel(FP8_BLOCK, codes, n, k, scale=_cpu_contiguous(dequant_scale, torch.float32),
                        br=block[0], bc=block[1])


def bind_hqq(w_q: torch.Tensor, scales: torch.Tensor, neg_zs: torch.Tensor, n: int, k: int, bits: int,
             group_size: int) -> Optional[FormatKernel]:
    """HQQ's packed codes (``[G, numel / G]`` for 8 bits, ``[G / 2, numel / G]`` for 4),
    its ``scales`` and ``-(zeros * scales)`` (``numel / G`` floats each)."""
    if not _usable(w_q, scales, neg_zs) or bits not in (4, 8):
        return None
    ncols = n * k // group_size
    rows = group_size if bits == 8 else group_size // 2
    if (n * k) % group_size or tuple(w_q.shape) != (rows, ncols) or scales.numel() != ncols \
            or neg_zs.numel() != ncols:
        return None
    return FormatKernel(HQQ8 if bits == 8 else HQQ4, _cpu_contiguous(w_q, torch.uint8), n, k,
                        scale=_cpu_contiguous(scales, torch.float32).reshape(-1),
                        aux=_cpu_contiguous(neg_zs, torch.float32).reshape(-1), br=group_size)
