"""4-bit ggml formats on torch's CPU weight-only int4 kernel.

``aten._weight_int4pack_mm_for_cpu`` computes ``x @ W.T`` with
``W[n, k] = (c[n, k] - 8) * scale[g, n] + zero[g, n]`` for 4-bit codes ``c`` and groups
``g = k // group`` (group ≥ 32). Q4_0, Q4_1 and Q4_K all have exactly this shape with
32-element groups, so they map without approximation on the code side:

    Q4_0: value = d·(c − 8)              -> scale d,    zero 0
    Q4_1: value = d·c + m                -> scale d,    zero m + 8d
    Q4_K: value = (d·sc)·c − dmin·mn     -> scale d·sc, zero 8·d·sc − dmin·mn

The kernel is fast only with bfloat16 activations, and then wants scale/zero in
bfloat16 too: that rounding (relative 2⁻⁹ on each) is the only error beyond the
bf16 rounding of activations and output. Types whose sub-blocks are 16 elements
(Q2_K, Q3_K, Q6_K) cannot be expressed, the kernel's smallest group being 32.
"""
from __future__ import annotations

import torch
from ..formats import T
from ..formats._bits import f16_at, low_high_nibbles, to_blocks
from ..formats.kquants import k_scale_min

GROUP = 32
# torch's packer wants N % 16 == 0; packing in chunks of this many rows bounds the int32
# staging copy it needs, and is a multiple of every N-tile the kernel uses (16/32/64).
_PACK_ROWS = 256


def _legacy(raw: torch.Tensor, type_size: int, name: str):
    b, lead = to_blocks(raw, type_size, name)
    codes = low_high_nibbles(b[:, type_size - 16:]).reshape(*lead, -1)
    return b, lead, codes


def _q4_0(raw):
    b, lead, codes = _legacy(raw, 18, "Q4_0")
    d = f16_at(b, 0).reshape(*lead, -1)
    return codes, d, torch.zeros_like(d)


def _q4_1(raw):
    b, lead, codes = _legacy(raw, 20, "Q4_1")
    d = f16_at(b, 0).reshape(*lead, -1)
    m = f16_at(b, 2).reshape(*lead, -1)
    return codes, d, m + 8 * d


def _q4_k(raw):
    b, lead = to_blocks(raw, 144, "Q4_K")
    n = b.shape[0]
    sc, mn = k_scale_min(b[:, 4:16])
    scale = f16_at(b, 0) * sc.float()                                   # [n, 8]
    zero = 8 * scale - f16_at(b, 2) * mn.float()
    codes = low_high_nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(*lead, -1)
    return codes, scale.reshape(*lead, -1), zero.reshape(*lead, -1)


AFFINE = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q4_K: _q4_k}


def supported(ggml_type: int) -> bool:
    return int(ggml_type) in AFFINE


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class Int4Packed:
    """A [N, K] 4-bit ggml weight repacked for the CPU int4 kernel (bfloat16 compute)."""

    def __init__(self, raw: torch.Tensor, ggml_type: int | None, dtype: torch.dtype = torch.bfloat16, *,
                 split=None, group: int = GROUP):
        """``split``: instead of a ggml type, a function of a slice of ``raw``'s rows
        returning ``(codes, scale, zero)`` in the kernel's convention, with groups of
        ``group`` (32/64/128) inputs (formats other than ggml's, e.g. AFQ)."""
        n = raw.shape[0]
        self.n = n
        self.n_pad = -(-n // 16) * 16
        self.dtype = dtype
        self.group = group
        split = split or AFFINE[int(ggml_type)]
        packed, sz = [], []
        for r0 in range(0, n, _PACK_ROWS):
            codes, scale, zero = split(raw[r0:r0 + _PACK_ROWS])
            rows = codes.shape[0]
            if r0 + rows == n and rows % 16:  # pad the last chunk with zero-weight rows
                pad = -(-rows // 16) * 16 - rows
                codes = torch.cat((codes, codes.new_full((pad, codes.shape[1]), 8)))
                scale = torch.cat((scale, scale.new_zeros(pad, scale.shape[1])))
                zero = torch.cat((zero, zero.new_zeros(pad, zero.shape[1])))
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1))
            sz.append(torch.stack((scale, zero), -1).to(dtype))
        self.k = codes.shape[1]
        self.packed = torch.cat(packed)
        # Kernel layout: [K / group, N, 2].
        self.scales_zeros = torch.cat(sz).transpose(0, 1).contiguous()

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def mm(self, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d`` [M, K] -> [M, N] in ``self.dtype``."""
        x2d = x2d.to(self.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, self.group, self.scales_zeros)
        return y[:, :self.n].contiguous() if self.n_pad != self.n else y

    def dequantize(self) -> torch.Tensor:
        """The weight as the kernel sees it, float32 [N, K]: ``I @ W.T`` through the kernel
        itself, so no assumption about torch's packed layout is needed (slow; for checks)."""
        eye = torch.eye(self.k, dtype=self.dtype)
        return self.mm(eye).t().float().contiguous()
