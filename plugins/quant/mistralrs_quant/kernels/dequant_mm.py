"""``x @ dequantize(raw).T`` computed a tile of weight rows at a time.

Tiling bounds the float temporaries to ``_TILE_ELEMS`` elements whatever the weight's
size (an lm_head can hold hundreds of millions), while keeping tiles large enough that
per-op overhead stays small next to the matmul.
"""
from __future__ import annotations

from typing import Callable

import torch

_TILE_ELEMS = 1 << 20


def tile_rows(n_rows: int, n_cols: int) -> int:
    return max(1, min(n_rows, _TILE_ELEMS // max(1, n_cols)))


def dequant_matmul(x2d: torch.Tensor, raw: torch.Tensor, dequantize: Callable[[torch.Tensor], torch.Tensor],
                   dtype: torch.dtype) -> torch.Tensor:
    """``x2d`` [M, K] (already ``dtype``) times the [N, K] weight in ``raw`` -> [M, N] ``dtype``."""
    n = raw.shape[0]
    k = x2d.shape[1]
    step = tile_rows(n, k)
    if step >= n:
        return torch.nn.functional.linear(x2d, dequantize(raw).to(dtype))
    out = torch.empty(x2d.shape[0], n, dtype=dtype, device=x2d.device)
    for r0 in range(0, n, step):
        w = dequantize(raw[r0:r0 + step]).to(dtype)
        torch.mm(x2d, w.t(), out=out[:, r0:r0 + w.shape[0]])
    return out
