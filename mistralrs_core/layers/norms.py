"""Normalisation layers; computed in float32 like the references."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm; ``offset=1.0`` gives the Gemma form ``x * (1 + w)``."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0, cast_before_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.offset = offset
        # Llama multiplies after casting back to the input dtype; Gemma multiplies in float32.
        self.cast_before_scale = cast_before_scale
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset or not self.cast_before_scale:
            return (h * (self.weight.float() + self.offset)).to(dtype)
        return self.weight.to(dtype) * h.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False) if bias else None

    def forward(self, x):
        return nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
