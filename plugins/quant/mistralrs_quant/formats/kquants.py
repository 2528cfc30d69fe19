"""K-quant super-blocks (256 elements): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, and MXFP4.

Layouts follow ggml's block_qN_K structs. Sub-block scales are combined with the
super-block scale first (``d * sc``) and only then applied to the quants, exactly in the
reference's order, so the float32 results match it bit for bit.
"""
from __future__ import annotations

import torch

from ._bits import bit_fields, f16_at, f32_at, from_blocks, low_high_nibbles, to_blocks

QK_K = 256


def _crumbs(b: torch.Tensor, groups: int) -> torch.Tensor:
    """2-bit fields: ``[n, groups*32]`` bytes -> ``[n, groups, 4, 32]`` (shift 0,2,4,6)."""
    return bit_fields(b.reshape(b.shape[0], groups, 32), 2)


def _bitplanes(b: torch.Tensor) -> torch.Tensor:
    """``[n, 32]`` mask bytes -> ``[n, 8, 32]``: plane j holds bit j of every byte."""
    return bit_fields(b, 1)


def dequantize_q2_k(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 84, "Q2_K")
    n = b.shape[0]
    sc = b[:, :16]
    d, dmin = f16_at(b, 80), f16_at(b, 82)
    dl = (d * (sc & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).float()).reshape(n, 16, 1)
    q = _crumbs(b[:, 16:80], 2).reshape(n, 16, 16).float()
    return from_blocks(q.mul_(dl).sub_(ml), lead)


def _q3_k_scales(s: torch.Tensor) -> torch.Tensor:
    # 16 six-bit scales: low 4 bits from nibbles of bytes 0..7, high 2 bits from bytes 8..11.
    n = s.shape[0]
    low = bit_fields(s[:, :8], 4).reshape(n, 16)
    high = bit_fields(s[:, 8:], 2).reshape(n, 16)
    return ((low | (high << 4)).to(torch.int8) - 32).float()


def dequantize_q3_k(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 110, "Q3_K")
    n = b.shape[0]
    d = f16_at(b, 108)
    dl = (d * _q3_k_scales(b[:, 96:108])).reshape(n, 16, 1)
    low = _crumbs(b[:, 32:96], 2).reshape(n, 16, 16)
    # A set hmask bit means "no offset"; a clear bit subtracts 4.
    high = (_bitplanes(b[:, :32]).reshape(n, 16, 16)) ^ 1
    q = (low.to(torch.int8) - (high << 2).to(torch.int8)).float()
    return from_blocks(q.mul_(dl).reshape(n, QK_K), lead)


def k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte Q4_K/Q5_K field into 8 six-bit scales and 8 six-bit mins."""
    s = s.reshape(s.shape[0], 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), -1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), -1)
    return sc, mn


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    sc, mn = k_scale_min(b[:, 4:16])
    dl = (f16_at(b, 0) * sc.float()).reshape(n, 8, 1)
    ml = (f16_at(b, 2) * mn.float()).reshape(n, 8, 1)
    return dl, ml


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    # 128 bytes -> 8 sub-blocks of 32: (low nibbles of 32 bytes, then their high nibbles) x 4.
    n = qs.shape[0]
    return low_high_nibbles(qs.reshape(n, 4, 32)).reshape(n, 8, 32)


def dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 144, "Q4_K")
    dl, ml = _k_scales(b)
    q = _k_nibbles(b[:, 16:]).float()
    return from_blocks(q.mul_(dl).sub_(ml).reshape(-1, QK_K), lead)


def dequantize_q5_k(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 176, "Q5_K")
    dl, ml = _k_scales(b)
    q = (_k_nibbles(b[:, 48:]) | (_bitplanes(b[:, 16:48]) << 4)).float()
    return from_blocks(q.mul_(dl).sub_(ml).reshape(-1, QK_K), lead)


def dequantize_q6_k(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 210, "Q6_K")
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    dl = (f16_at(b, 208) * scales).reshape(n, 16, 1)
    low = low_high_nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
    high = _crumbs(b[:, 128:192], 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return from_blocks(q.mul_(dl).reshape(n, QK_K), lead)


def dequantize_q8_k(raw: torch.Tensor) -> torch.Tensor:
    # block_q8_K = {f32 d, int8 qs[256], int16 bsums[16]}; bsums only speed up dot products.
    b, lead = to_blocks(raw, 292, "Q8_K")
    q = b[:, 4:260].contiguous().view(torch.int8).float()
    return from_blocks(q.mul_(f32_at(b, 0)), lead)


# e2m1 code points, doubled so they are integers; the half is folded into the scale.
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def e8m0_to_f32_half(e: torch.Tensor) -> torch.Tensor:
    """2**(e-127) / 2 built from bits, so e = 0 and 1 land on exact subnormals."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def dequantize_mxfp4(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 17, "MXFP4")
    d = e8m0_to_f32_half(b[:, :1])
    idx = low_high_nibbles(b[:, 1:]).reshape(-1).to(torch.int32)
    # index_select with int32 indices is the fastest table lookup torch has on CPU.
    q = torch.tensor(MXFP4_VALUES, dtype=torch.float32).index_select(0, idx).reshape(-1, 32)
    return from_blocks(q.mul_(d), lead)
