"""Linear and embedding layers whose weight may be a quantized method."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.quantized import QuantMethod


class UnquantizedMethod:
    """Plain dense weight; registered as the core's ``none`` quantizer."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x):
        return F.linear(x, self.weight)

    def embedding(self, ids):
        return F.embedding(ids, self.weight)

    def dequantize(self):
        return self.weight.float()


class Linear(nn.Module):
    """``y = x W^T + b`` where W is a dense parameter or a plugin's ``QuantMethod``.

    ``lora``: None, or a callable ``(x, y) -> y`` that adds per-token low-rank updates
    (``mistralrs_core.adapters``) after the one base matmul."""

    lora = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False)
                     if bias else None)
        self.qmethod: QuantMethod | None = None

    def set_quant_method(self, method: QuantMethod) -> None:
        if (method.out_features, method.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight has shape {(method.out_features, method.in_features)}, "
                             f"expected {(self.out_features, self.in_features)}")
        self.qmethod = method
        # Drop the dense parameter so memory holds only the packed form.
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qmethod is not None:
            y = self.qmethod.forward(x)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        else:
            y = F.linear(x, self.weight)
        if self.bias is not None:
            y = y + self.bias
        if self.lora is not None:
            y = self.lora(x, y)
        return y

    def extra_repr(self):
        q = f", quant={type(self.qmethod).__name__}" if self.qmethod is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{q}"


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device="meta"), requires_grad=False)
        self.qmethod: QuantMethod | None = None

    def set_quant_method(self, method: QuantMethod) -> None:
        if (method.out_features, method.in_features) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"quantized weight has shape {(method.out_features, method.in_features)}, "
                             f"expected {(self.num_embeddings, self.embedding_dim)}")
        self.qmethod = method
        self.weight = None

    def forward(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.qmethod is not None:
            out = self.qmethod.embedding(ids)
            return out.to(dtype) if dtype is not None else out
        return F.embedding(ids, self.weight)

    def as_lm_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tied output projection ``x @ E^T``."""
        if self.qmethod is not None:
            return self.qmethod.forward(x)
        return F.linear(x, self.weight)


def fuse_linears(parts: list[Linear]) -> Linear | None:
    """One Linear computing ``cat([p(x) for p in parts], -1)``, or None if they can't be
    fused (mixed storage, or a quant method without ``concat``). Fewer, larger matmuls cut
    per-op overhead on the decode path, which dominates small models on CPU.

    The fused layer records ``fused_parts``: each part's HF name (``hf_name``, set at load)
    and its rows ``[start, stop)``, so the checkpoint names stay resolvable for UQFF
    writing, LoRA targeting and sharding (``loading.weights.resolve_weight``)."""
    in_f = parts[0].in_features
    if any(p.in_features != in_f for p in parts):
        return None
    out_f = sum(p.out_features for p in parts)
    quant = [p.qmethod for p in parts]
    if all(q is None for q in quant):
        weights = [p.weight for p in parts]
        if any(w is None or w.device.type == "meta" for w in weights) or len({w.dtype for w in weights}) != 1:
            return None
        method = None
        weight = torch.cat([w.data for w in weights], 0)
    elif all(q is not None for q in quant) and len({type(q) for q in quant}) == 1:
        concat = getattr(type(quant[0]), "concat", None)
        method = concat(quant) if concat is not None else None
        if method is None:
            return None
        weight = None
    else:
        return None
    has_bias = any(p.bias is not None for p in parts)
    fused = Linear(in_f, out_f, bias=has_bias)
    if method is not None:
        fused.set_quant_method(method)
    else:
        fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        ref = next(p.bias for p in parts if p.bias is not None)
        fused.bias = nn.Parameter(torch.cat([
            p.bias.data if p.bias is not None else torch.zeros(p.out_features, dtype=ref.dtype, device=ref.device)
            for p in parts]), requires_grad=False)
    rows, start = [], 0
    for p in parts:
        rows.append((getattr(p, "hf_name", None), start, start + p.out_features))
        start += p.out_features
    fused.fused_parts = tuple(rows)
    return fused
