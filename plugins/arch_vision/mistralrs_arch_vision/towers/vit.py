"""The pre-norm ViT encoder layer CLIP's and SigLIP's towers (and the towers built on them)
share, with transformers' module names: ``layer_norm1``, ``self_attn.{q,k,v,out}_proj``,
``layer_norm2``, ``mlp.fc1``/``fc2``. Inputs are packed ``[T, D]`` or padded ``[B, S, D]``;
the ``EncoderBatch`` handed to every layer says which tokens see each other."""
from __future__ import annotations

import torch
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention_backends import EncoderBatch, encoder_attention
from mistralrs_core.layers.linear import Linear, fuse_linears
from mistralrs_core.layers.norms import LayerNorm


class ViTAttention(nn.Module):
    """Bidirectional multi-head attention with biased projections."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, hidden // heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = Linear(hidden, hidden, bias=True)
        self.k_proj = Linear(hidden, hidden, bias=True)
        self.v_proj = Linear(hidden, hidden, bias=True)
        self.out_proj = Linear(hidden, hidden, bias=True)
        self._qkv_runtime: Linear | None = None

    def post_load(self) -> None:
        """One matmul for q/k/v when their storage allows; the fused layer keeps the
        checkpoint names (``fused_parts``), so ``resolve_weight`` still finds each."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self._qkv_runtime = fused
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        lead = x.shape[:-1]
        shape = (*lead, self.num_heads, self.head_dim)
        if self._qkv_runtime is not None:
            q, k, v = self._qkv_runtime(x).view(*lead, 3, self.num_heads, self.head_dim).unbind(-3)
        else:
            q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        out = encoder_attention(q, k, v, batch, scale=self.scale)
        return self.out_proj(out.reshape(*lead, -1))


class ViTMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.act = get_activation(act)
        self.fc1 = Linear(hidden, intermediate, bias=True)
        self.fc2 = Linear(intermediate, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTEncoderLayer(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int, eps: float, act: str):
        super().__init__()
        self.layer_norm1 = LayerNorm(hidden, eps=eps)
        self.self_attn = ViTAttention(hidden, heads)
        self.layer_norm2 = LayerNorm(hidden, eps=eps)
        self.mlp = ViTMLP(hidden, intermediate, act)

    def forward(self, x: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), batch)
        return x + self.mlp(self.layer_norm2(x))


class ViTEncoder(nn.Module):
    """``encoder.layers.N`` of the checkpoint."""

    def __init__(self, num_layers: int, hidden: int, intermediate: int, heads: int, eps: float, act: str):
        super().__init__()
        self.layers = nn.ModuleList(ViTEncoderLayer(hidden, intermediate, heads, eps, act)
                                    for _ in range(num_layers))
