"""MiniCPM-V 2.6's resampler: one set of learned queries cross-attends over a slice's
vision patches, whose keys carry 2-D sine-cosine positions, and comes out in the text
model's width.

Per slice of h x w patches: kv = LayerNorm(kv_proj(patches)); keys = kv + pos(h, w), values =
kv; queries = LayerNorm(query) (no positions); one multi-head attention with torch's
``nn.MultiheadAttention`` parameters (``attn.in_proj_weight`` stacked q/k/v with biases,
``attn.out_proj``), padded patches hidden; then LayerNorm and a bias-free ``proj`` matrix
(x @ proj). Heads: text hidden // 128, as the hub model builds it.

The positions are the hub's: for patch (row i, col j), the first half of the channels is
the 1-D sin/cos embedding of the *column* j and the second half of the row i (the hub builds
its grid with ``meshgrid(w, h)`` and embeds grid[0] first), each half being
[sin(pos * omega), cos(pos * omega)] with omega = 10000^(-k / (D/4)). They are computed in
float32 with numpy as the reference computes them and cached for the largest grid seen.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.attention_backends import EncoderBatch, encoder_attention
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.norms import LayerNorm


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[..., dim] float32: sin then cos of pos * omega_k, omega_k = 10000^(-k / (dim / 2))."""
    omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
    omega = np.float32(1.0) / np.float32(10000) ** omega
    angles = pos[..., None].astype(np.float32) * omega
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """[rows, cols, dim] float32 positions of a rows x cols patch grid (column half first)."""
    if dim % 4:
        raise ValueError(f"the resampler's width {dim} must be a multiple of 4 for 2-D sin/cos positions")
    col = np.broadcast_to(np.arange(cols, dtype=np.float32)[None, :], (rows, cols))
    row = np.broadcast_to(np.arange(rows, dtype=np.float32)[:, None], (rows, cols))
    return torch.from_numpy(np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], axis=-1))


class CrossAttention(nn.Module):
    """torch ``nn.MultiheadAttention``'s parameters, computed by the encoder backend."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"resampler: width {dim} does not split into {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, device="meta"), requires_grad=False)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, device="meta"), requires_grad=False)
        self.out_proj = Linear(dim, dim, bias=True)

    def forward(self, query, key, value, key_mask):
        """query [B, Q, D]; key/value [B, S, D]; key_mask [B, S] True on real rows or None."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, nq, _ = query.shape
        s = key.shape[1]
        q = F.linear(query, wq, bq).view(b, nq, self.num_heads, self.head_dim)
        k = F.linear(key, wk, bk).view(b, s, self.num_heads, self.head_dim)
        v = F.linear(value, wv, bv).view(b, s, self.num_heads, self.head_dim)
        out = encoder_attention(q, k, v, EncoderBatch.padded(key_mask), scale=self.head_dim ** -0.5)
        return self.out_proj(out.reshape(b, nq, -1))


class SincosResampler(nn.Module):
    """Vision patches [B, S, kv_dim] of slices with patch grids ``tgt_sizes`` ->
    [B, num_queries, dim]. Module names equal the hub's ``resampler.*``."""

    def __init__(self, num_queries: int, dim: int, num_heads: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.query = nn.Parameter(torch.empty(num_queries, dim, device="meta"), requires_grad=False)
        # The hub replaces the projection by an identity when the widths agree.
        self.kv_proj = Linear(kv_dim, dim, bias=False) if kv_dim != dim else None
        self.attn = CrossAttention(dim, num_heads)
        self.ln_q = LayerNorm(dim, eps=eps)
        self.ln_kv = LayerNorm(dim, eps=eps)
        self.ln_post = LayerNorm(dim, eps=eps)
        self.proj = nn.Parameter(torch.empty(dim, dim, device="meta"), requires_grad=False)
        self._pos = torch.zeros(0, 0, dim)
        self._pos_lock = threading.Lock()

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """[rows * cols, dim] float32 (CPU), from a cache grown to the largest grid seen."""
        with self._pos_lock:
            have_r, have_c = self._pos.shape[:2]
            if rows > have_r or cols > have_c:
                self._pos = sincos_2d(self.dim, max(rows, have_r), max(cols, have_c))
            pos = self._pos
        return pos[:rows, :cols].reshape(rows * cols, self.dim)

    def forward(self, x: torch.Tensor, tgt_sizes: list[tuple[int, int]], mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, S, kv_dim] with slice b's patches in rows [0, h_b * w_b) (raster order);
        ``mask`` [B, S] True on those rows (None: every row is real)."""
        b, s, _ = x.shape
        pos = x.new_zeros(b, s, self.dim)
        for i, (rows, cols) in enumerate(tgt_sizes):
            pos[i, :rows * cols] = self.positions(rows, cols).to(device=x.device, dtype=x.dtype)
        kv = self.kv_proj(x) if self.kv_proj is not None else x
        kv = self.ln_kv(kv)
        q = self.ln_q(self.query.to(x.dtype)).expand(b, -1, -1)
        out = self.attn(q, kv + pos, kv, mask)
        return self.ln_post(out) @ self.proj.to(x.dtype)
