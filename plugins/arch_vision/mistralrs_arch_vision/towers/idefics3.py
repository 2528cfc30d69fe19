"""Idefics3's vision transformer and connector.

The tower is SigLIP's (same layers, same checkpoint names, no pooling head) except for
its positions: it takes images of any size in whole patches, and gives each patch of an
h x w grid the learned position of the cell it falls in when the grid is stretched over
the ``image_size / patch_size`` square table (NaViT-style fractional positions). A grid
as large as the table reads the table as SigLIP does.

The reference also takes a patch mask for images padded within a batch; Idefics3's
processor yields only whole tiles (its mask is all ones for every real tile), so every
image here is unpadded and the positions cover its whole grid.
"""
from __future__ import annotations

import torch
from torch import nn

from mistralrs_core.layers.linear import Linear

from mistralrs_arch_vision.towers.siglip import SiglipEmbeddings, SiglipTowerConfig, SiglipVisionTower
from mistralrs_arch_vision.towers.siglip_navit import fractional_position_ids

# transformers' Idefics3VisionConfig defaults (not SigLIP's: 1152 wide, 16 heads, patch 32).
IDEFICS3_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=16, num_channels=3, image_size=224, patch_size=32,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def idefics3_tower_config(vision_config: dict) -> SiglipTowerConfig:
    return SiglipTowerConfig.from_hf({**IDEFICS3_VISION_DEFAULTS, **vision_config, "vision_use_head": False})


class Idefics3VisionEmbeddings(SiglipEmbeddings):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] (H, W whole patches) -> [B, (H / patch) * (W / patch), D]."""
        h, w = pixel_values.shape[-2:]
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"Idefics3 tower: image size {h}x{w} is not a whole number of {p}-pixel patches")
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        positions = fractional_position_ids(h // p, w // p, self.cfg.patches_per_side).to(patches.device)
        return patches + self.position_embedding(positions).to(patches.dtype)


class Idefics3VisionTower(SiglipVisionTower):
    """SigLIP's tower (no head) with fractional positions. Checkpoint names are transformers'
    ``Idefics3VisionTransformer``'s, which equal SigLIP's."""

    def __init__(self, cfg: SiglipTowerConfig, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, use_head=False, dtype=dtype)
        self.embeddings = Idefics3VisionEmbeddings(cfg)


class Idefics3Connector(nn.Module):
    """Pixel shuffle (each ``scale`` x ``scale`` block of patches becomes one token with
    scale^2 times the channels) then a bias-free linear into the text model's space.
    Checkpoint names: ``connector.modality_projection.proj.weight``."""

    def __init__(self, vision_hidden: int, text_hidden: int, scale: int):
        super().__init__()
        self.scale = scale
        self.modality_projection = nn.Module()
        self.modality_projection.proj = Linear(vision_hidden * scale * scale, text_hidden, bias=False)

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[B, side^2, D] -> [B, (side / s)^2, D * s^2]. Token (I, J) of the output holds patches
        (s*I + a, s*J + b), ordered by a then b, each with its D channels contiguous."""
        b, n, d = x.shape
        side, s = int(round(n ** 0.5)), self.scale
        if side * side != n or side % s:
            raise ValueError(f"pixel shuffle: {n} patches are not a square grid whose side divides by {s}")
        grid = x.reshape(b, side // s, s, side // s, s, d)          # [B, I, a, J, bb, D]
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(b, (side // s) ** 2, s * s * d)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.modality_projection.proj(self.pixel_shuffle(patches))
