"""The Pixtral vision transformer (Mistral 3's tower): images of any size (multiples of the
patch), a bias-free conv patch embedding, 2-D rotary positions over the patch grid,
RMSNorm pre-norm layers with a gated SiLU-style MLP.

All images of a call are packed into one token sequence; attention is block-diagonal (a
patch sees only its own image), which is what ``EncoderBatch.packed`` expresses. Module
names equal transformers' ``PixtralVisionModel`` (``patch_conv``, ``ln_pre``,
``transformer.layers.N.attention.q_proj`` ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention_backends import EncoderBatch, encoder_attention
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.norms import RMSNorm
from mistralrs_core.layers.rope import apply_rotary

# The reference hard-codes this epsilon for every norm of the tower (the config has none).
_NORM_EPS = 1e-5


@dataclass(frozen=True)
class PixtralTowerConfig:
    """Fields of an HF ``pixtral`` ``vision_config``; defaults are ``PixtralVisionConfig``'s."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 16
    hidden_act: str = "gelu"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, vc: dict) -> "PixtralTowerConfig":
        kwargs = {k: vc[k] for k in cls.__dataclass_fields__ if vc.get(k) is not None}
        rope = vc.get("rope_parameters") or {}
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ValueError(f"vision_config.rope_parameters: rope_type {rope['rope_type']!r} is not Pixtral's "
                             f"axial rope")
        if rope.get("rope_theta") is not None:
            kwargs["rope_theta"] = rope["rope_theta"]
        patch = kwargs.get("patch_size")
        if isinstance(patch, (list, tuple)):
            if len(set(patch)) != 1:
                raise ValueError(f"vision_config.patch_size: non-square patch {patch} is not supported")
            kwargs["patch_size"] = patch[0]
        cfg = cls(**kwargs)
        if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 4:
            raise ValueError(f"vision_config: hidden_size {cfg.hidden_size} / num_attention_heads "
                             f"{cfg.num_attention_heads} must be a head size divisible by 4 (2-D rope)")
        return cfg

    @property
    def head_dim(self) -> int:
        # The reference derives it; a config's own head_dim key is ignored there too.
        return self.hidden_size // self.num_attention_heads


def grid_rope(cfg: PixtralTowerConfig, grids: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [sum(h * w), head_dim] for the packed patches of images with ``grids``
    (rows, cols): the first quarter of frequencies (even ones) turns with the row, the next
    quarter (odd ones) with the column; the halves repeat for rotate-half."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    rows = torch.cat([torch.arange(h, device=device).repeat_interleave(w) for h, w in grids]).float()
    cols = torch.cat([torch.arange(w, device=device).repeat(h) for h, w in grids]).float()
    f = torch.cat([rows[:, None] * inv[0::2], cols[:, None] * inv[1::2]], dim=-1)
    f = torch.cat([f, f], dim=-1)
    return f.cos(), f.sin()


class PixtralAttention(nn.Module):
    def __init__(self, cfg: PixtralTowerConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.o_proj = Linear(d, d)

    def forward(self, x, cos, sin, batch: EncoderBatch):
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, self.heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.heads, self.head_dim)
        out = encoder_attention(q, k, v, batch, scale=self.head_dim ** -0.5)
        return self.o_proj(out.reshape(t, -1))


class PixtralMLP(nn.Module):
    def __init__(self, cfg: PixtralTowerConfig):
        super().__init__()
        self.act = get_activation(cfg.hidden_act)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PixtralLayer(nn.Module):
    def __init__(self, cfg: PixtralTowerConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, _NORM_EPS)
        self.attention = PixtralAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, _NORM_EPS)
        self.feed_forward = PixtralMLP(cfg)

    def forward(self, x, cos, sin, batch):
        x = x + self.attention(self.attention_norm(x), cos, sin, batch)
        return x + self.feed_forward(self.ffn_norm(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: PixtralTowerConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([PixtralLayer(cfg) for _ in range(num_layers)])


class PixtralVisionTower(nn.Module):
    """``forward(images, layers)`` -> the packed states the reference lists as
    ``hidden_states[i]`` (0: the patch embeddings after ``ln_pre``, i: layer i's output;
    negative indices count from the checkpoint's depth), concatenated on the channel axis,
    and each image's patch grid. Only layers up to the deepest one asked for are built."""

    def __init__(self, cfg: PixtralTowerConfig, feature_layers: list[int]):
        super().__init__()
        self.cfg = cfg
        depth = cfg.num_hidden_layers
        self.feature_layers = [i if i >= 0 else depth + 1 + i for i in feature_layers]
        if not all(0 <= i <= depth for i in self.feature_layers):
            raise ValueError(f"vision_feature_layer: {feature_layers} is outside the tower's {depth} layers")
        self.built_layers = max(self.feature_layers)
        self.patch_conv = nn.Module()
        self.patch_conv.weight = nn.Parameter(
            torch.empty(cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size, device="meta"),
            requires_grad=False)
        self.ln_pre = RMSNorm(cfg.hidden_size, _NORM_EPS)
        self.transformer = _Transformer(cfg, self.built_layers)

    def keeps_weight(self, name: str) -> bool:
        if name.startswith("transformer.layers."):
            return int(name.split(".")[2]) < self.built_layers
        return True

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """images: [3, H, W] each (H, W multiples of the patch) -> ([sum patches, hidden *
        len(layers)], [(rows, cols)] per image)."""
        p, w = self.cfg.patch_size, self.patch_conv.weight
        # One conv per image: sizes differ, and a padded batch would only be cropped again.
        embeds = [F.conv2d(im.to(w.dtype)[None], w, stride=p)[0] for im in images]
        grids = [(e.shape[1], e.shape[2]) for e in embeds]
        h = self.ln_pre(torch.cat([e.flatten(1).T for e in embeds]))
        cos, sin = grid_rope(self.cfg, grids, h.device)
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        batch = EncoderBatch.packed([r * c for r, c in grids])
        wanted = set(self.feature_layers)
        states = {0: h} if 0 in wanted else {}
        for i, layer in enumerate(self.transformer.layers, start=1):
            h = layer(h, cos, sin, batch)
            if i in wanted:
                states[i] = h
        return torch.cat([states[i] for i in self.feature_layers], dim=-1), grids
