"""Byte-level helpers shared by the block formats.

Every dequantizer receives ``raw`` as uint8 ``[..., n_bytes_per_row]`` and works on a
``[n_blocks, type_size]`` view of it. Scalars stored inside a block (f16 / f32 scales)
sit at byte offsets that are not aligned for a typed view of the whole tensor, so they
are sliced out and made contiguous before being reinterpreted.
"""
from __future__ import annotations

import torch


def to_blocks(raw: torch.Tensor, type_size: int, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Flatten ``raw`` to ``[n_blocks, type_size]``; also return the leading shape."""
    if raw.dtype != torch.uint8:
        raise TypeError(f"{name}: raw data must be uint8, got {raw.dtype}")
    if raw.dim() == 0 or raw.shape[-1] % type_size != 0:
        raise ValueError(f"{name}: bytes per row ({raw.shape[-1] if raw.dim() else 0}) "
                         f"is not a multiple of the block size in bytes ({type_size})")
    lead = tuple(raw.shape[:-1])
    return raw.reshape(-1, type_size), lead


def from_blocks(values: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """``[n_blocks, block_size]`` float values back to ``[*lead, n_elements_per_row]``."""
    return values.reshape(*lead, -1)


def f16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 stored at ``offset`` of each block, as float32 ``[n_blocks, 1]``."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def f32_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    return blocks[:, offset:offset + 4].contiguous().view(torch.float32)


def bit_fields(b: torch.Tensor, width: int, axis: int = -2) -> torch.Tensor:
    """Split every byte of ``b`` into its 8/width fields of ``width`` bits, lowest first,
    stacked along a new ``axis``.

    Each field is one scalar shift-and-mask on a contiguous tensor: torch's broadcasting
    shift by a tensor of shift amounts is several times slower on CPU.
    """
    b = b.contiguous()
    mask = (1 << width) - 1
    fields = [b & mask] + [(b >> s) & mask for s in range(width, 8, width)]
    return torch.stack(fields, dim=axis)


def low_high_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, m]`` bytes -> ``[n, 2, m]``: low nibbles first, then high nibbles.

    This is the ordering every 4-bit ggml format uses: element i of a 2m group is the
    low nibble of byte i, element m+i the high nibble of byte i.
    """
    return bit_fields(qs, 4)


def bits_le(b: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` bytes -> ``[n, 8k]`` single bits, little-endian bit order."""
    return bit_fields(b, 1, axis=-1).reshape(*b.shape[:-1], -1)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Inverse of ``low_high_nibbles`` for ``[n, 2m]`` values in 0..15 -> ``[n, m]`` bytes."""
    half = q.shape[-1] // 2
    q = q.to(torch.uint8)
    return q[..., :half] | (q[..., half:] << 4)


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[n, 1]`` -> its f16 encoding as ``[n, 2]`` bytes (round to nearest even)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(x.shape[0], 2)


def f32_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous().view(torch.uint8).reshape(x.shape[0], 4)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """roundf(): halves go away from zero (ggml's scalar quantizers use it).

    Written as floor(a) + floor(2·frac) rather than floor(a + 0.5): the latter rounds
    0.49999997 up because a + 0.5 is itself rounded to 1.0 in float32.
    """
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def safe_reciprocal(d: torch.Tensor) -> torch.Tensor:
    """1/d with 0 where d == 0, as the reference quantizers do."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def flatten_rows(x: torch.Tensor, block_size: int, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Float input ``[..., n]`` -> float32 ``[n_blocks, block_size]`` for quantizers."""
    if x.dim() == 0 or x.shape[-1] % block_size != 0:
        raise ValueError(f"{name}: row length ({x.shape[-1] if x.dim() else 0}) "
                         f"is not a multiple of the block size ({block_size})")
    return x.to(torch.float32).reshape(-1, block_size), tuple(x.shape[:-1])
