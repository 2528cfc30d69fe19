"""F8Q8: upstream's Q8_0-like blocks whose scale is stored as FP8 E4M3.

A block is 33 bytes: one float8_e4m3fn byte holding ``d · 448`` and 32 int8 codes, where
``d = max|x| / 127`` over the block's 32 inputs and ``q = round(x / d)`` (ties away from
zero, as Rust's ``f32::round``; the codes use the exact ``d``, the stored scale is the
FP8-rounded one). Dequantized: ``x = q · fp8(d · 448) / 448``.

Upstream runs F8Q8 on the CPU only and its ``forward`` dequantizes then multiplies; ours
runs the C++ kernels of ``kernels/qformats.py`` (the same float32 weight values, decoded a
cache tile at a time), or dequantizes then multiplies without them. Its UQFF entry stores the raw blocks as a flat u8 tensor with the block count and the
weight shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import qformats

QK = 32
BLOCK_BYTES = 33
FP8_MAX = 448.0
_SERDE_F8Q8 = 5          # upstream's QuantizedSerdeType::F8Q8


def quantize_blocks(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float -> [out, in / 32, 33] uint8 blocks."""
    out, inn = weight.shape
    x = weight.detach().to(torch.float32).reshape(out, inn // QK, QK)
    d = x.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    y = x * inv
    q = (torch.sign(y) * torch.floor(y.abs() + 0.5)).clamp(-128, 127).to(torch.int8)
    scale = (d * FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([scale, q.view(torch.uint8)], -1)


def dequantize_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """[rows, nb, 33] uint8 -> [rows, nb * 32] float32."""
    d = blocks[..., :1].contiguous().view(torch.float8_e4m3fn).to(torch.float32) / FP8_MAX
    q = blocks[..., 1:].contiguous().view(torch.int8).to(torch.float32)
    return (q * d).reshape(blocks.shape[0], -1)


class F8Q8Method:
    def __init__(self, blocks: torch.Tensor, shape):
        self.out_features, self.in_features = (int(s) for s in shape)
        if self.in_features % QK:
            raise ValueError(f"F8Q8: input size {self.in_features} is not a multiple of {QK}")
        self.blocks = blocks.reshape(self.out_features, self.in_features // QK, BLOCK_BYTES)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int | None = None, group_size: int | None = None,
                   device=None) -> "F8Q8Method":
        if bits not in (None, 8):
            raise ValueError(f"F8Q8 is 8-bit, got bits={bits}")
        if weight.dim() != 2 or weight.shape[1] % QK:
            raise ValueError(f"F8Q8: the weight's last dimension must be a multiple of {QK}, "
                             f"got shape {tuple(weight.shape)}")
        device = torch.device(device) if device is not None else weight.device
        if device.type != "cpu":
            raise ValueError(f"F8Q8 is CPU-only (as upstream); choose FP8 or another ISQ type for {device}")
        return cls(quantize_blocks(weight).to(device), weight.shape)

    def dequantize(self) -> torch.Tensor:
        return dequantize_blocks(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = qformats.cached(self, lambda: qformats.bind_f8q8(self.blocks, self.out_features, self.in_features))
        if k is not None:
            return k.forward(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize()
        return F.linear(x, w if x.dtype == torch.float32 else w.to(x.dtype))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).long()
        return dequantize_blocks(self.blocks[flat]).reshape(*ids.shape, self.in_features)

    @classmethod
    def concat(cls, methods) -> "F8Q8Method | None":
        first = methods[0]
        if any(type(m) is not cls or m.in_features != first.in_features for m in methods):
            return None
        return cls(torch.cat([m.blocks for m in methods]),
                   (sum(m.out_features for m in methods), first.in_features))

    def slice_rows(self, start: int, stop: int) -> "F8Q8Method":
        """Output rows ``start:stop`` (a fused layer's part, for UQFF): blocks run along a row."""
        return type(self)(self.blocks[start:stop], (stop - start, self.in_features))

    # Tensor parallelism: whole rows, or columns at 32-wide block boundaries.
    def take_rows(self, ranges: list[tuple[int, int]]) -> "F8Q8Method":
        blocks = torch.cat([self.blocks[a:b] for a, b in ranges])
        return type(self)(blocks, (blocks.shape[0], self.in_features))

    def take_cols(self, start: int, stop: int) -> "F8Q8Method":
        if start % QK or stop % QK:
            raise ValueError(f"F8Q8: columns [{start}, {stop}) do not fall on its blocks of {QK}; use a "
                             f"tensor-parallel size whose shards are multiples of {QK} wide")
        return type(self)(self.blocks[:, start // QK:stop // QK].contiguous(), (self.out_features, stop - start))

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def to_uqff_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight.format": torch.tensor(_SERDE_F8Q8, dtype=torch.uint8),
            "weight": self.blocks.reshape(-1),
            "weight.num_blocks": torch.tensor(self.blocks.shape[0] * self.blocks.shape[1], dtype=torch.uint32),
            "weight.shape": torch.tensor([self.out_features, self.in_features], dtype=torch.uint32),
        }

    @classmethod
    def from_uqff_tensors(cls, t: dict) -> "F8Q8Method":
        if int(t["weight.format"]) != _SERDE_F8Q8:
            raise ValueError(f"weight.format: expected {_SERDE_F8Q8} (F8Q8), got {int(t['weight.format'])}")
        shape = [int(s) for s in t["weight.shape"].reshape(-1).tolist()]
        blocks = t["weight"]
        if blocks.numel() != int(t["weight.num_blocks"]) * BLOCK_BYTES:
            raise ValueError(f"weight.num_blocks: {int(t['weight.num_blocks'])} blocks need "
                             f"{int(t['weight.num_blocks']) * BLOCK_BYTES} bytes, got {blocks.numel()}")
        return cls(blocks, shape)

    def __repr__(self) -> str:
        return f"F8Q8Method(out={self.out_features}, in={self.in_features})"
