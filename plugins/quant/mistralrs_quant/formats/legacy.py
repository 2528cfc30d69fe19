"""The 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.

The arithmetic mirrors the reference (gguf-py / ggml) operation by operation, in
float32, so results are bit-identical: e.g. Q4_1 is ``(d * q) + m`` as two roundings,
never a fused multiply-add.
"""
from __future__ import annotations

import torch

from ._bits import (bits_le, f16_at, f16_bytes, flatten_rows, from_blocks, low_high_nibbles,
                    pack_nibbles, round_half_away, safe_reciprocal, to_blocks)

QK = 32


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    return low_high_nibbles(qs).reshape(qs.shape[0], QK)


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # qh holds bit 4 of element i at bit i of a little-endian uint32.
    return _nibbles(qs) | (bits_le(qh) << 4)


def dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 18, "Q4_0")
    q = (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()
    return from_blocks(q.mul_(f16_at(b, 0)), lead)


def dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 20, "Q4_1")
    q = _nibbles(b[:, 4:]).float()
    return from_blocks(q.mul_(f16_at(b, 0)).add_(f16_at(b, 2)), lead)


def dequantize_q5_0(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 22, "Q5_0")
    q = (_five_bit(b[:, 2:6], b[:, 6:]).to(torch.int8) - 16).float()
    return from_blocks(q.mul_(f16_at(b, 0)), lead)


def dequantize_q5_1(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 24, "Q5_1")
    q = _five_bit(b[:, 4:8], b[:, 8:]).float()
    return from_blocks(q.mul_(f16_at(b, 0)).add_(f16_at(b, 2)), lead)


def dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    b, lead = to_blocks(raw, 34, "Q8_0")
    q = b[:, 2:].contiguous().view(torch.int8).float()
    return from_blocks(q.mul_(f16_at(b, 0)), lead)


def dequantize_q8_1(raw: torch.Tensor) -> torch.Tensor:
    # ggml's block_q8_1 is {f16 d, f16 s = d*sum(q), int8 qs[32]}; s is only a dot-product
    # shortcut, the value is d*q.
    b, lead = to_blocks(raw, 36, "Q8_1")
    q = b[:, 4:].contiguous().view(torch.int8).float()
    return from_blocks(q.mul_(f16_at(b, 0)), lead)


# ---------------------------------------------------------------- quantizers

def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    blocks, lead = flatten_rows(x, QK, "Q8_0")
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = round_half_away(blocks * safe_reciprocal(d)).to(torch.int8).view(torch.uint8)
    return torch.cat((f16_bytes(d), q), -1).reshape(*lead, -1)


def quantize_q8_1(x: torch.Tensor) -> torch.Tensor:
    blocks, lead = flatten_rows(x, QK, "Q8_1")
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = round_half_away(blocks * safe_reciprocal(d))
    s = q.sum(-1, keepdim=True) * d
    q = q.to(torch.int8).view(torch.uint8)
    return torch.cat((f16_bytes(d), f16_bytes(s), q), -1).reshape(*lead, -1)


def _signed_absmax(blocks: torch.Tensor) -> torch.Tensor:
    # The value (with its sign) of largest magnitude; first one on ties, like argmax.
    return blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    blocks, lead = flatten_rows(x, QK, "Q4_0")
    d = _signed_absmax(blocks) / -8
    q = torch.trunc(blocks * safe_reciprocal(d) + 8.5).clamp(0, 15)
    return torch.cat((f16_bytes(d), pack_nibbles(q)), -1).reshape(*lead, -1)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    blocks, lead = flatten_rows(x, QK, "Q4_1")
    mx = blocks.amax(-1, keepdim=True)
    mn = blocks.amin(-1, keepdim=True)
    d = (mx - mn) / 15
    q = torch.trunc((blocks - mn) * safe_reciprocal(d) + 0.5).clamp(0, 15)
    return torch.cat((f16_bytes(d), f16_bytes(mn), pack_nibbles(q)), -1).reshape(*lead, -1)


def _pack_five_bit(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = q.to(torch.uint8)
    qs = pack_nibbles(q & 0x0F)
    hi = (q >> 4).reshape(q.shape[0], 4, 8)
    weights = (torch.ones(8, dtype=torch.uint8) << torch.arange(8, dtype=torch.uint8))
    qh = (hi * weights).sum(-1, dtype=torch.uint8)  # at most one bit per weight: no carry
    return qh, qs


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    blocks, lead = flatten_rows(x, QK, "Q5_0")
    d = _signed_absmax(blocks) / -16
    q = torch.trunc(blocks * safe_reciprocal(d) + 16.5).clamp(0, 31)
    qh, qs = _pack_five_bit(q)
    return torch.cat((f16_bytes(d), qh, qs), -1).reshape(*lead, -1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    blocks, lead = flatten_rows(x, QK, "Q5_1")
    mx = blocks.amax(-1, keepdim=True)
    mn = blocks.amin(-1, keepdim=True)
    d = (mx - mn) / 31
    q = torch.trunc((blocks - mn) * safe_reciprocal(d) + 0.5).clamp(0, 31)
    qh, qs = _pack_five_bit(q)
    return torch.cat((f16_bytes(d), f16_bytes(mn), qh, qs), -1).reshape(*lead, -1)
