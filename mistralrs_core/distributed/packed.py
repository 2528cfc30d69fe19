"""Slicing checkpoint tensors for a shard: dense tensors, and packed (quantized) weights
along whole blocks.

A packed weight keeps its rows whole (every block runs along a row), so taking rows is a
byte copy of those rows. Taking columns (the input dimension of a row-parallel layer) is
exact only at block boundaries: a block is the unit its scale belongs to. A packed type
may offer ``take_rows(ranges)`` / ``take_cols(start, stop)`` itself; GGUF/GGML blocks
(objects with ``raw`` [rows, row_bytes], ``ggml_type``, ``shape``) are handled here with
the block layout the quant plugin publishes.
"""
from __future__ import annotations

import torch


def _is_ggml(w) -> bool:
    return all(hasattr(w, a) for a in ("raw", "ggml_type", "shape"))


def _rebuild(w, raw: torch.Tensor, shape: tuple[int, int]):
    return type(w)(raw, w.ggml_type, shape, cpp_impl=getattr(w, "cpp_impl", None))


def take_rows(w, ranges: list[tuple[int, int]], name: str):
    """Rows ``[a, b)`` of each range, concatenated (dim 0)."""
    if isinstance(w, torch.Tensor):
        parts = [w[a:b] for a, b in ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    own = getattr(w, "take_rows", None)
    if own is not None:
        return own(ranges)
    if _is_ggml(w) and len(w.shape) == 2:
        raw = w.raw.reshape(w.shape[0], -1)
        parts = [raw[a:b] for a, b in ranges]
        raw = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return _rebuild(w, raw, (raw.shape[0], w.shape[1]))
    raise ValueError(f"{name}: cannot shard a packed {type(w).__name__} by rows for tensor parallelism")


def block_size_of(w) -> int:
    """Elements per quantization block of a packed weight (1 for dense)."""
    if isinstance(w, torch.Tensor):
        return 1
    own = getattr(w, "block_size", None)
    if isinstance(own, int):
        return own
    if _is_ggml(w):
        from mistralrs_quant.formats import get_format   # only reached with a ggml weight in hand
        return get_format(w.ggml_type).block_size
    raise ValueError(f"cannot tell the block size of a packed {type(w).__name__}")


def take_cols(w, start: int, stop: int, name: str):
    """Columns ``[start, stop)`` (dim 1). Packed weights: only at block boundaries."""
    if isinstance(w, torch.Tensor):
        return w[:, start:stop]
    own = getattr(w, "take_cols", None)
    if own is not None:
        return own(start, stop)
    if _is_ggml(w) and len(w.shape) == 2:
        bs = block_size_of(w)
        if start % bs or stop % bs:
            raise ValueError(f"{name}: its input dimension {w.shape[1]} cannot be split at [{start}, {stop}) "
                             f"into whole quantization blocks of {bs}; use a tensor-parallel size whose "
                             f"shards are multiples of {bs} wide")
        rows, n_blocks = w.shape[0], w.shape[1] // bs
        raw = w.raw.reshape(rows, n_blocks, -1)[:, start // bs:stop // bs].reshape(rows, -1).contiguous()
        return _rebuild(w, raw, (rows, stop - start))
    raise ValueError(f"{name}: cannot shard a packed {type(w).__name__} by columns for tensor parallelism")
