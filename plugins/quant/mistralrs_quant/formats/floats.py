"""Plain float element types (block size 1)."""
from __future__ import annotations

import torch

from ._bits import to_blocks


def _rows(raw: torch.Tensor, itemsize: int, name: str) -> torch.Tensor:
    blocks, lead = to_blocks(raw, itemsize, name)
    # A typed view needs a contiguous last dimension; .reshape already gave one.
    return blocks.reshape(*lead, -1)


def dequantize_f32(raw: torch.Tensor) -> torch.Tensor:
    return _rows(raw, 4, "F32").contiguous().view(torch.float32)


def dequantize_f16(raw: torch.Tensor) -> torch.Tensor:
    return _rows(raw, 2, "F16").contiguous().view(torch.float16).float()


def dequantize_bf16(raw: torch.Tensor) -> torch.Tensor:
    return _rows(raw, 2, "BF16").contiguous().view(torch.bfloat16).float()


def quantize_f32(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32).contiguous()
    return x.view(torch.uint8).reshape(*x.shape[:-1], -1)


def quantize_f16(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float16).contiguous()
    return x.view(torch.uint8).reshape(*x.shape[:-1], -1)


def quantize_bf16(x: torch.Tensor) -> torch.Tensor:
    # Bitwise round-to-nearest-even as ggml_compute_fp32_to_bf16 does; torch's own cast
    # canonicalises NaN payloads differently, which would break bit-exactness.
    n = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    is_nan = (n & 0x7FFFFFFF) > 0x7F800000
    quiet = (n & 0xFFFF0000) | (64 << 16)
    n = torch.where(is_nan, quiet, n)
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    out = (n & 0xFFFF).to(torch.int32).to(torch.int16)  # wraps into int16 bit pattern
    return out.contiguous().view(torch.uint8).reshape(*x.shape[:-1], -1)
