"""A dense weight in the compute dtype, prepacked for oneDNN when that pays.

oneDNN's bf16/f16 matmul re-lays the weight out for AMX/AVX-512 on every call; doing that
once at load (``mkldnn._reorder_linear_weight``) halves the time for M ≤ 64 on this CPU
and matches it for large M. float32 gains nothing (MKL's GEMV is already at speed), so
float32 weights stay plain tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _can_prepack(w: torch.Tensor) -> bool:
    return (w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class DenseWeight:
    def __init__(self, w: torch.Tensor, prepack: bool = True):
        self.shape = tuple(w.shape)
        self.dtype = w.dtype
        self.packed = None
        self.plain = w
        if prepack and _can_prepack(w):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
                self.plain = None
            except RuntimeError:  # a torch built without this oneDNN path: keep the plain weight
                self.packed = None

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.finfo(self.dtype).bits // 8

    def mm(self, x2d: torch.Tensor) -> torch.Tensor:
        x2d = x2d.to(self.dtype)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x2d.contiguous(), self.packed, None, "none", [], "")
        return F.linear(x2d, self.plain)

    def to_dense(self) -> torch.Tensor:
        return self.plain if self.packed is None else self.packed.to_dense()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.to_dense().index_select(0, ids)
