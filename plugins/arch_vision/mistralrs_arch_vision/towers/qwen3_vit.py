"""Qwen3-VL's vision transformer: dynamic-resolution patches, a learned position table
resampled to each image's grid, 2-D rotary attention, LayerNorm blocks with a GELU(tanh)
MLP, a 2 x 2 patch merger to the text width, and *deepstack* mergers that project the
states of a few intermediate blocks for the text model's first layers.

Input is what ``processors/qwen2_vl.py`` produces: flattened patches (one row per
``temporal x patch x patch`` patch, channel-major) in merge-block order (the
``merge x merge`` patches of one output token are consecutive rows), and each image's grid
(t, h, w) in patches. All images of a call are packed into one sequence; attention is
block-diagonal per frame (``EncoderBatch.packed``). Module names equal transformers'
``Qwen3VLVisionModel`` (``patch_embed.proj``, ``pos_embed``, ``blocks.N.attn.qkv``,
``merger.linear_fc1``, ``deepstack_merger_list.K`` ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention_backends import EncoderBatch, encoder_attention
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.norms import LayerNorm
from mistralrs_core.layers.rope import apply_rotary

from mistralrs_arch_vision.towers.qwen_vit import _linear

# The reference hard-codes this epsilon for every LayerNorm of the tower.
_NORM_EPS = 1e-6


@dataclass(frozen=True)
class Qwen3VisionConfig:
    """Fields of an HF ``qwen3_vl`` ``vision_config``; defaults are ``Qwen3VLVisionConfig``'s."""
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, vc: dict) -> "Qwen3VisionConfig":
        kw = {k: vc[k] for k in cls.__dataclass_fields__ if vc.get(k) is not None}
        for alias, name in (("num_hidden_layers", "depth"), ("num_attention_heads", "num_heads")):
            if name not in kw and vc.get(alias) is not None:
                kw[name] = vc[alias]
        for key in ("patch_size", "temporal_patch_size"):
            if isinstance(kw.get(key), (list, tuple)):
                if len(set(kw[key])) != 1:
                    raise ValueError(f"vision_config.{key}: a non-cubic patch {kw[key]} is not supported")
                kw[key] = kw[key][0]
        rope = vc.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ValueError(f"vision_config.rope_parameters: rope_type {rope['rope_type']!r} is not the "
                             f"tower's axial rope")
        if rope.get("rope_theta") is not None:
            kw["rope_theta"] = float(rope["rope_theta"])
        deep = kw.get("deepstack_visual_indexes", cls.deepstack_visual_indexes)
        kw["deepstack_visual_indexes"] = tuple(int(i) for i in deep)
        cfg = cls(**kw)
        if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
            raise ValueError(f"vision_config: hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must be "
                             f"a head size divisible by 4 (2-D rope)")
        side = int(round(cfg.num_position_embeddings ** 0.5))
        if side * side != cfg.num_position_embeddings:
            raise ValueError(f"vision_config.num_position_embeddings: {cfg.num_position_embeddings} is not a "
                             f"square grid")
        bad = [i for i in cfg.deepstack_visual_indexes if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"vision_config.deepstack_visual_indexes: {bad} outside the tower's {cfg.depth} blocks")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def grid_side(self) -> int:
        return int(round(self.num_position_embeddings ** 0.5))


def _block_order(h: int, w: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each patch of an h x w grid, listed merge block by merge block."""
    rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
    cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
    # (block row, block col, in-block row, in-block col)
    return rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)


def _bilinear_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps [n, 2] into a ``side``-long table and their weights, for positions ``index`` on
    an axis of ``size`` (align_corners: the ends map to 0 and side - 1)."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = src.floor()
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


class PatchEmbed(nn.Module):
    """The reference's stride = kernel Conv3d over one patch is a matmul with its weight
    flattened in the patch rows' (channel, time, y, x) order."""

    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size,
                                                    cfg.patch_size, cfg.patch_size, device="meta"),
                                        requires_grad=False)
        self.proj.bias = nn.Parameter(torch.empty(cfg.hidden_size, device="meta"), requires_grad=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cos, sin, batch: EncoderBatch):
        t = x.shape[0]
        q, k, v = _linear(self.qkv, x).view(t, 3, self.heads, self.head_dim).unbind(1)
        # The reference rotates in float32 whatever the model dtype.
        q = apply_rotary(q.float(), cos, sin).to(x.dtype)
        k = apply_rotary(k.float(), cos, sin).to(x.dtype)
        out = encoder_attention(q, k, v, batch, scale=self.head_dim ** -0.5)
        return _linear(self.proj, out.reshape(t, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.act = get_activation(cfg.hidden_act)
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x):
        return _linear(self.linear_fc2, self.act(_linear(self.linear_fc1, x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.hidden_size, _NORM_EPS)
        self.norm2 = LayerNorm(cfg.hidden_size, _NORM_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, batch):
        x = x + self.attn(self.norm1(x), cos, sin, batch)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """``merge x merge`` consecutive patch rows -> one row of the text width. The final
    merger normalises each patch before concatenating; the deepstack mergers
    (``postshuffle``) normalise the concatenation."""

    def __init__(self, cfg: Qwen3VisionConfig, postshuffle: bool):
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(self.width if postshuffle else cfg.hidden_size, _NORM_EPS)
        self.linear_fc1 = Linear(self.width, self.width, bias=True)
        self.linear_fc2 = Linear(self.width, cfg.out_hidden_size, bias=True)

    def forward(self, x):
        x = self.norm(x.reshape(-1, self.width)) if self.postshuffle else self.norm(x).reshape(-1, self.width)
        return _linear(self.linear_fc2, F.gelu(_linear(self.linear_fc1, x)))


class Qwen3VisionTower(nn.Module):
    """``forward(patches, grids)`` -> ([tokens, out_hidden] merged features, [K, tokens,
    out_hidden] deepstack features), tokens = sum of t * h * w / merge² over the images."""

    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Module()
        self.pos_embed.weight = nn.Parameter(torch.empty(cfg.num_position_embeddings, cfg.hidden_size,
                                                         device="meta"), requires_grad=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(cfg, postshuffle=True)
                                                   for _ in cfg.deepstack_visual_indexes)

    @property
    def num_deepstack(self) -> int:
        return len(self.cfg.deepstack_visual_indexes)

    def tokens_of(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.cfg.spatial_merge_size ** 2

    def check_grid(self, grid: tuple[int, int, int], patches: int) -> None:
        t, h, w = grid
        m = self.cfg.spatial_merge_size
        if min(t, h, w) < 1 or h % m or w % m or t * h * w != patches:
            raise ValueError(f"image grid {grid}: needs sides that are multiples of the merge size {m} and "
                             f"{t * h * w} patch rows, got {patches}")

    def position_embeddings(self, grids, device) -> torch.Tensor:
        """The learned table resampled (bilinear, align_corners) to each grid, rows in the
        patches' merge-block order, repeated for every frame."""
        side, m = self.cfg.grid_side, self.cfg.spatial_merge_size
        table = self.pos_embed.weight
        out = []
        for t, h, w in grids:
            rows, cols = _block_order(h, w, m)
            rt, rw = _bilinear_taps(rows, h, side)
            ct, cw = _bilinear_taps(cols, w, side)
            idx = (rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4).to(device)
            wts = (rw[:, :, None] * cw[:, None, :]).reshape(-1, 4).to(device=device, dtype=table.dtype)
            emb = (table[idx] * wts[:, :, None]).sum(1)
            out.append(emb.repeat(t, 1) if t > 1 else emb)
        return torch.cat(out)

    def rotary(self, grids, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [patches, head_dim] float32: the first half of the rotary frequencies
        turns with the patch row, the second with the column (then repeated for rotate-half)."""
        quarter = self.cfg.head_dim // 2
        inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter))
        f = []
        for t, h, w in grids:
            rows, cols = _block_order(h, w, self.cfg.spatial_merge_size)
            fr = torch.cat([rows.float()[:, None] * inv, cols.float()[:, None] * inv], dim=-1)
            f.append(fr.repeat(t, 1) if t > 1 else fr)
        f = torch.cat(f).to(device)
        f = torch.cat([f, f], dim=-1)
        return f.cos(), f.sin()

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]):
        dev = self.pos_embed.weight.device
        h = self.patch_embed(patches.to(dev))
        h = h + self.position_embeddings(grids, dev).to(h.dtype)
        cos, sin = self.rotary(grids, dev)
        batch = EncoderBatch.packed([hh * ww for t, hh, ww in grids for _ in range(t)])
        deep, where = [], {layer: k for k, layer in enumerate(self.cfg.deepstack_visual_indexes)}
        for i, block in enumerate(self.blocks):
            h = block(h, cos, sin, batch)
            if i in where:
                deep.append(self.deepstack_merger_list[where[i]](h))
        merged = self.merger(h)
        return merged, (torch.stack(deep) if deep else merged.new_empty(0, *merged.shape))
