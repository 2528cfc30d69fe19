"""MXFP4 as GPT-OSS checkpoints store it (the OCP microscaling format, Hugging Face layout).

``*_blocks`` uint8 ``[..., rows, in / 32, 16]``: 32 FP4 (E2M1) codes per block, two per
byte, the low nibble first (element ``2k`` low, ``2k + 1`` high); ``*_scales`` uint8
``[..., rows, in / 32]``: the block's E8M0 exponent, ``2^(e − 127)``. A code's value is
``±{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` (bit 3 the sign). GPT-OSS stores its experts as
``gate_up_proj_blocks`` ``[E, 2I, H / 32, 16]`` (gate and up rows interleaved) and
``down_proj_blocks`` ``[E, H, I / 32, 16]``: rows are output features, as a linear's weight.

(ggml's MXFP4 is the same code book in another byte order, low nibbles first for elements
0..15 of a block; the GGUF path keeps that one.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``[..., rows, nb, 16]`` blocks and ``[..., rows, nb]`` scales -> float32 ``[..., rows, nb·32]``."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    b = blocks.to(torch.int64)
    vals = torch.stack([lut[b & 0x0F], lut[b >> 4]], -1).flatten(-2)          # [..., nb, 32]
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1).to(torch.float32))
    return vals.flatten(-2)


class MXFP4Method:
    """One weight ``[out, in]`` in MXFP4 blocks; ``forward`` dequantizes then multiplies."""

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor):
        if blocks.dtype != torch.uint8 or blocks.dim() != 3 or blocks.shape[-1] != 16:
            raise ValueError(f"MXFP4 blocks must be uint8 [out, in/32, 16], got {blocks.dtype} {tuple(blocks.shape)}")
        if tuple(scales.shape) != tuple(blocks.shape[:2]):
            raise ValueError(f"MXFP4 scales {tuple(scales.shape)} do not match blocks {tuple(blocks.shape)}")
        self.blocks, self.scales = blocks, scales
        self.out_features, self.in_features = blocks.shape[0], blocks.shape[1] * 32

    def dequantize(self) -> torch.Tensor:
        return dequantize_mxfp4(self.blocks, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize()
        return F.linear(x, w if x.dtype == torch.float32 else w.to(x.dtype))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).long()
        return dequantize_mxfp4(self.blocks[flat], self.scales[flat]).reshape(*ids.shape, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel()
