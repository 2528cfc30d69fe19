"""Triton matmuls that read quantized weights in place: ``y = x @ W.T`` with W decoded
tile by tile in registers (``block_decode``), never materialised in memory.

Two kernels share the decoders:

``_gemv_kernel``  decode (M ≤ ``GEMV_MAX_M``): each program owns a strip of output
                  columns for all M rows and reduces x·w with float32 multiply-adds (M is
                  too small for tensor cores; the cost is reading the packed weight once).
``_gemm_kernel``  prefill: BLOCK_M x BLOCK_N output tiles, ``tl.dot`` on the decoded
                  weight tile (converted to x's dtype, as the torch path converts the
                  dequantized weight; float32 inputs use IEEE float32 products, not TF32).

Both accumulate in float32. ``dequantize`` writes the float32 weight, bit-identical to the
torch dequantizers. Every launch passes ``enable_fp_fusion=False``: otherwise the GPU
compiler contracts ``q·d − m`` into one fused multiply-add and the formats with an offset
(Q4_1, Q5_1, Q2_K, Q4_K, Q5_K) would decode one rounding away from torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .block_decode import AFQ, HQQ, weight_tile

GEMV_MAX_M = 8


@dataclass(frozen=True)
class QuantizedView:
    """What the kernels need to find element (n, k) of a packed weight."""
    data: torch.Tensor          # the packed codes (uint8 bytes, or int32 words for AFQ)
    aux_a: torch.Tensor         # AFQ scales / HQQ scales (else ``data``, unused)
    aux_b: torch.Tensor         # AFQ biases / HQQ zeros (else ``data``, unused)
    fmt: int                    # ggml type id, ``AFQ`` or ``HQQ``
    n: int
    k: int
    row: int = 0                # bytes (ggml) or words (AFQ) per row
    aux: int = 0                # AFQ groups per row, HQQ columns of the grouped view
    bits: int = 0
    group: int = 1
    qk: int = 1                 # ggml elements per block
    ts: int = 1                 # ggml bytes per block

    def args(self):
        return (self.data, self.aux_a, self.aux_b)

    def meta(self):
        return dict(FMT=self.fmt, BITS=self.bits, GROUP=self.group, QK=self.qk, TS=self.ts)


def ggml_view(raw: torch.Tensor, ggml_type: int, block_size: int, type_size: int) -> QuantizedView:
    n, row = raw.shape
    return QuantizedView(raw, raw, raw, int(ggml_type), n, row // type_size * block_size, row=row,
                         qk=block_size, ts=type_size)


def afq_view(w_q, scales, biases, bits: int, group: int) -> QuantizedView:
    n, words = w_q.shape
    data = w_q.view(torch.int32) if w_q.dtype != torch.int32 else w_q
    return QuantizedView(data.contiguous(), scales.contiguous(), biases.contiguous(), AFQ, n,
                         words * 32 // bits, row=words, aux=scales.shape[1], bits=bits, group=group)


def hqq_view(w_q, scales, zeros, out_features: int, in_features: int, bits: int, group: int) -> QuantizedView:
    return QuantizedView(w_q.contiguous(), scales.reshape(-1).float().contiguous(),
                         zeros.reshape(-1).float().contiguous(), HQQ, out_features, in_features,
                         aux=out_features * in_features // group, bits=bits, group=group)


@triton.jit
def _dequant_kernel(w_ptr, a_ptr, b_ptr, out_ptr, N, K, ROW, AUX, FMT: tl.constexpr, BITS: tl.constexpr,
                    GROUP: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = tl.minimum(rn, N - 1).to(tl.int64)[:, None]
    k = tl.minimum(rk, K - 1).to(tl.int64)[None, :]
    w = weight_tile(w_ptr, a_ptr, b_ptr, n, k, K, ROW, AUX, FMT, BITS, GROUP, QK, TS)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    tl.store(out_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :], w, mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, a_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, ROW, AUX,
                 FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, QK: tl.constexpr,
                 TS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = tl.minimum(rn, N - 1).to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k = tl.minimum(rk, K - 1).to(tl.int64)[None, :]
        w = weight_tile(w_ptr, a_ptr, b_ptr, n, k, K, ROW, AUX, FMT, BITS, GROUP, QK, TS)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, a_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, ROW, AUX,
                 FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, QK: tl.constexpr,
                 TS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = tl.minimum(rn, N - 1).to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k = tl.minimum(rk, K - 1).to(tl.int64)[None, :]
        w = weight_tile(w_ptr, a_ptr, b_ptr, n, k, K, ROW, AUX, FMT, BITS, GROUP, QK, TS)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = w.to(x.dtype)
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mask)


# triton's CPU interpreter (3.9) returns garbage for bfloat16 dot operands (numpy has no
# bfloat16; float16 is fine): there the already-rounded operands are widened to float32 for
# the dot, which gives the same products (exact in float32), only summed in another order.
_INTERPRETED = type(_gemm_kernel).__name__ == "InterpretedFunction"


def dequantize(view: QuantizedView) -> torch.Tensor:
    """The weight as float32 [N, K]."""
    out = torch.empty(view.n, view.k, dtype=torch.float32, device=view.data.device)
    bn, bk = 16, 64
    grid = (triton.cdiv(view.n, bn), triton.cdiv(view.k, bk))
    _dequant_kernel[grid](*view.args(), out, view.n, view.k, view.row, view.aux, **view.meta(),
                          BLOCK_N=bn, BLOCK_K=bk, enable_fp_fusion=False)
    return out


def matmul(x2d: torch.Tensor, view: QuantizedView, out_dtype: torch.dtype | None = None,
           gemv_max_m: int = GEMV_MAX_M) -> torch.Tensor:
    """``x2d`` [M, K] (float32/bfloat16/float16) @ W.T -> [M, N] in ``out_dtype`` (x's by default)."""
    if x2d.shape[1] != view.k:
        raise ValueError(f"input has {x2d.shape[1]} features, weight expects {view.k}")
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    m = x2d.shape[0]
    y = torch.empty(m, view.n, dtype=out_dtype or x2d.dtype, device=x2d.device)
    if m == 0:
        return y
    if m <= gemv_max_m:
        bm = triton.next_power_of_2(m)
        # The [BM, BN, BK] product tile lives in registers: ~2048 floats a program keeps it
        # within the register file at 4 warps (8x32x64 used all 255 registers on sm_90, and
        # 1x32x128 spilled for Q5_K). 16 columns a program: a 4096-row weight still makes
        # 256 programs, though decode of narrow layers would want split-K (not done).
        bn, bk = 16, max(16, 128 // bm)
        grid = (triton.cdiv(view.n, bn),)
        _gemv_kernel[grid](x2d, *view.args(), y, m, view.n, view.k, x2d.stride(0), y.stride(0), view.row,
                           view.aux, **view.meta(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, enable_fp_fusion=False)
        return y
    # float32 tiles of the bit-stream formats spilled at 32x64 on sm_90 (ptxas -v).
    bm, bn, bk = (32, 64, 32) if x2d.dtype != torch.float32 else (32, 32, 32)
    precision = "ieee" if x2d.dtype == torch.float32 else None  # None: the default for bf16/f16
    grid = (triton.cdiv(m, bm), triton.cdiv(view.n, bn))
    _gemm_kernel[grid](x2d, *view.args(), y, m, view.n, view.k, x2d.stride(0), y.stride(0), view.row, view.aux,
                       **view.meta(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PRECISION=precision,
                       UPCAST=_INTERPRETED and x2d.dtype == torch.bfloat16, enable_fp_fusion=False)
    return y
