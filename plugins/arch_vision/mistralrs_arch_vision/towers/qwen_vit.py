"""The Qwen2-VL and Qwen2.5-VL vision transformers: images of any size, as the processor's
flattened patches (``processors/qwen2_vl.py``).

* The patch embedding is a bias-free 3-D convolution whose stride equals its kernel, i.e. one
  matmul of each flattened patch row with the kernel viewed as [embed, C*tp*p*p].
* 2-D rotary positions: the first half of the rotary frequencies turns with the patch's row,
  the second half with its column (head_dim / 4 frequencies each, repeated for rotate-half).
* Qwen2-VL blocks: LayerNorm, quick-GELU MLP. Qwen2.5-VL blocks: RMSNorm, gated SiLU MLP with
  biases, and window attention: every block except ``fullatt_block_indexes`` attends within
  windows of ``window_size`` pixels (whole merged tokens). The rows are reordered once so
  each window is a contiguous run (``window_order``), every block runs on that order, and the
  merged tokens are put back in raster order at the end.
* The merger normalises, concatenates the ``merge x merge`` patches of each token (consecutive
  rows, by the processor's order) and maps them through linear-GELU-linear.

All images of a call are one packed sequence; attention is block-diagonal over images (and
over a video's temporal patches, or over windows), expressed by ``EncoderBatch.packed``. Module names equal the checkpoint's
(``patch_embed.proj``, ``blocks.N.attn.qkv``, ``merger.mlp.0`` ...).
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

# The reference hard-codes this epsilon for every norm of the tower and the merger.
_NORM_EPS = 1e-6


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"vision_config.{name}: non-cubic {value} is not supported")
        value = value[0]
    return int(value)


@dataclass(frozen=True)
class QwenViTConfig:
    depth: int
    hidden_size: int               # the blocks' width
    out_hidden_size: int           # the merger's output: the text model's hidden size
    num_heads: int
    intermediate_size: int
    hidden_act: str
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    qwen25: bool = False           # RMSNorm + gated MLP + window attention
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, vc: dict, *, qwen25: bool, text_hidden: int) -> "QwenViTConfig":
        """From a ``vision_config`` (defaults are transformers' ``Qwen2VLVisionConfig`` /
        ``Qwen2_5_VLVisionConfig``; Qwen2-VL's merger outputs ``hidden_size`` there, its blocks
        are ``embed_dim`` wide)."""
        rope = vc.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ValueError(f"vision_config.rope_parameters: rope_type {rope['rope_type']!r} is not the "
                             f"axial rope of Qwen's vision tower")
        common = dict(num_heads=int(vc.get("num_heads", 16)), depth=int(vc.get("depth", 32)),
                      patch_size=_square(vc.get("patch_size", 14), "patch_size"),
                      temporal_patch_size=_square(vc.get("temporal_patch_size", 2), "temporal_patch_size"),
                      spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
                      in_channels=int(vc.get("in_channels", vc.get("in_chans", 3))),
                      rope_theta=float(rope.get("rope_theta", 10000.0)))
        if qwen25:
            cfg = cls(hidden_size=int(vc.get("hidden_size", 3584)),
                      out_hidden_size=int(vc.get("out_hidden_size", text_hidden)),
                      intermediate_size=int(vc.get("intermediate_size", 3420)),
                      hidden_act=vc.get("hidden_act", "silu"), qwen25=True,
                      window_size=int(vc.get("window_size", 112)),
                      fullatt_block_indexes=tuple(int(i) for i in vc.get("fullatt_block_indexes", (7, 15, 23, 31))),
                      **common)
            unit = cfg.patch_size * cfg.spatial_merge_size
            if cfg.window_size < unit or cfg.window_size % unit:
                raise ValueError(f"vision_config.window_size: {cfg.window_size} must be a positive multiple of "
                                 f"patch_size x spatial_merge_size = {unit}")
        else:
            embed = int(vc.get("embed_dim", 1280))
            cfg = cls(hidden_size=embed, out_hidden_size=int(vc.get("hidden_size", text_hidden)),
                      intermediate_size=int(embed * vc.get("mlp_ratio", 4)),
                      hidden_act=vc.get("hidden_act", "quick_gelu"), **common)
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise ValueError(f"vision_config: hidden size {cfg.hidden_size} / num_heads {cfg.num_heads} must be a "
                             f"head size divisible by 4 (2-D rope)")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, col) [N, 2] of each patch row in the processor's order: frame by frame,
    merge block by merge block in raster order, the block's patches in raster order."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        hw = torch.stack([rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)], -1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def window_order(grids: list[tuple[int, int, int]], merge: int, tokens_per_window: int
                 ) -> tuple[torch.Tensor, list[int]]:
    """(merged-token order, window lengths in patches): the merged tokens of every image
    regrouped window by window (windows of ``tokens_per_window`` x ``tokens_per_window``
    tokens in raster order per frame, tokens raster order inside; edge windows are smaller),
    images one after another."""
    order, lens, base = [], [], 0
    v = tokens_per_window
    for t, h, w in grids:
        lh, lw = h // merge, w // merge
        nh, nw = -(-lh // v), -(-lw // v)
        idx = torch.full((t, nh * v, nw * v), -1, dtype=torch.long)
        idx[:, :lh, :lw] = torch.arange(t * lh * lw).view(t, lh, lw) + base
        idx = idx.view(t, nh, v, nw, v).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, v * v)
        keep = idx >= 0
        order.append(idx[keep])
        lens += [int(n) * merge * merge for n in keep.sum(-1).tolist() if n]
        base += t * lh * lw
    return torch.cat(order), lens


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in float32 as the reference does whatever the tower's
    dtype; the rotated half is added in place (two multiply-adds over half the dims) rather
    than built with cat and neg: 2x faster at 3072 patches."""
    xf = x.float()
    h = xf.shape[-1] // 2
    out = xf * cos
    out[..., :h].addcmul_(xf[..., h:], sin[..., :h], value=-1)
    out[..., h:].addcmul_(xf[..., :h], sin[..., h:])
    return out.to(x.dtype)


def _linear(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """A dense layer's bias rides in the GEMM (addmm: one pass over the output, ~25% of a
    bf16 [3072, 1280] x [1280, 3420] product saved on CPU); quantized or adapted layers take
    their own path."""
    if type(layer) is Linear and layer.qmethod is None and layer.lora is None:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)


class _RMSNorm(nn.Module):
    """Qwen2.5-VL's RMSNorm (float32 statistics, the weight applied in the input dtype) as
    one fused kernel instead of five elementwise passes."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device="meta"), requires_grad=False)

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class QwenVisionAttention(nn.Module):
    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cos, sin, batch: EncoderBatch):
        t = x.shape[0]
        qkv = _linear(self.qkv, x).view(t, 3, self.heads, self.head_dim)
        # q and k rotated in one pass: [T, 2, H, D] against cos/sin [T, 1, 1, D]
        q, k = _rope(qkv[:, :2], cos[:, None], sin[:, None]).unbind(1)
        out = encoder_attention(q, k, qkv[:, 2], batch, scale=self.head_dim ** -0.5)
        return _linear(self.proj, out.reshape(t, -1))


class _PlainMLP(nn.Module):
    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.act = get_activation(cfg.hidden_act)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x):
        return _linear(self.fc2, self.act(_linear(self.fc1, x)))


class _GatedMLP(nn.Module):
    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.act = get_activation(cfg.hidden_act)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x):
        return _linear(self.down_proj, self.act(_linear(self.gate_proj, x)) * _linear(self.up_proj, x))


def _norm(cfg: QwenViTConfig, dim: int) -> nn.Module:
    return _RMSNorm(dim, _NORM_EPS) if cfg.qwen25 else LayerNorm(dim, eps=_NORM_EPS)


class QwenVisionBlock(nn.Module):
    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.norm1 = _norm(cfg, cfg.hidden_size)
        self.attn = QwenVisionAttention(cfg)
        self.norm2 = _norm(cfg, cfg.hidden_size)
        self.mlp = _GatedMLP(cfg) if cfg.qwen25 else _PlainMLP(cfg)

    def forward(self, x, cos, sin, batch):
        x = x + self.attn(self.norm1(x), cos, sin, batch)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.unit = cfg.spatial_merge_size ** 2
        wide = cfg.hidden_size * self.unit
        self.ln_q = _norm(cfg, cfg.hidden_size)
        # ``mlp.0`` / ``mlp.2`` in the checkpoint (an nn.Sequential with the GELU at 1)
        self.mlp = nn.Sequential(Linear(wide, wide, bias=True), nn.GELU(), Linear(wide, cfg.out_hidden_size, bias=True))

    def forward(self, x):
        x = self.ln_q(x).reshape(-1, self.ln_q.weight.shape[0] * self.unit)
        return _linear(self.mlp[2], self.mlp[1](_linear(self.mlp[0], x)))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(
            torch.empty(cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size,
                        device="meta"), requires_grad=False)

    def forward(self, patches):
        w = self.proj.weight
        return patches.to(w.dtype) @ w.view(w.shape[0], -1).T


class QwenVisionTower(nn.Module):
    """``forward(patches, grids)``: the processor's rows of all images, concatenated
    [N, C*tp*p*p], and each image's (t, h, w) grid -> merged features [N / merge^2,
    out_hidden_size] in the same image order, each image's tokens in raster order."""

    def __init__(self, cfg: QwenViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = _PatchEmbed(cfg)
        self.blocks = nn.ModuleList(QwenVisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def rope(self, grids, device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos, sin [N, head_dim]: rows' angles from the first half of the frequencies,
        columns' from the second."""
        d = self.cfg.head_dim // 2
        inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        pos = patch_positions(grids, self.cfg.spatial_merge_size).float()
        f = torch.cat([pos[:, :1] * inv, pos[:, 1:] * inv], -1)
        f = torch.cat([f, f], -1).to(device)
        return f.cos()[:, None, :], f.sin()[:, None, :]

    def check(self, patches: torch.Tensor, grids) -> None:
        m = self.cfg.spatial_merge_size
        if patches.dim() != 2 or patches.shape[1] != self.cfg.patch_dim:
            raise ValueError(f"vision input: patches must be [N, {self.cfg.patch_dim}], got {tuple(patches.shape)}")
        if any(h % m or w % m or t < 1 for t, h, w in grids):
            raise ValueError(f"vision input: grids {grids} must have h and w multiples of {m}")
        if sum(t * h * w for t, h, w in grids) != patches.shape[0]:
            raise ValueError(f"vision input: grids {grids} hold {sum(t * h * w for t, h, w in grids)} patches, "
                             f"got {patches.shape[0]} rows")

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        self.check(patches, grids)
        cfg, unit = self.cfg, self.cfg.spatial_merge_size ** 2
        x = self.patch_embed(patches)
        cos, sin = self.rope(grids, x.device)
        # Full attention is per temporal patch (a video's frame pairs do not see each other
        # in the tower), as in the reference.
        per_image = EncoderBatch.packed([h * w for t, h, w in grids for _ in range(t)])
        if not cfg.qwen25:
            for blk in self.blocks:
                x = blk(x, cos, sin, per_image)
            return self.merger(x)
        order, lens = window_order(grids, cfg.spatial_merge_size,
                                   cfg.window_size // (cfg.patch_size * cfg.spatial_merge_size))
        order = order.to(x.device)

        def regroup(rows):
            return rows.view(-1, unit, *rows.shape[1:])[order].flatten(0, 1)
        x, cos, sin = regroup(x), regroup(cos), regroup(sin)
        windows = EncoderBatch.packed(lens)
        full = set(cfg.fullatt_block_indexes)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, per_image if i in full else windows)
        out = self.merger(x)
        return out[torch.argsort(order)]
