"""Phi-4-multimodal's image encoder: a SigLIP tower over 448-pixel crops, 2x2 average pooling,
the HD layout with learned separators, and a two-layer GELU projection into the text space.

The tower (transformers' ``Phi4MultimodalVisionModel``, Microsoft's ``img_processor``) is
SigLIP with NaViT positions: each crop carries a patch mask (1 = image, 0 = white padding
the processor added), a crop whose image covers h x w patches looks its positions up by the
fractions (i / h, j / w) over the whole grid (padding patches take cell 0), and padding
patches are hidden as keys (they still compute as queries: the 2x2 pooling mixes them into
the edge features, as the reference's do). Features are ``hidden_states[feature_layer]``:
the output of an intermediate layer, no final norm, so the layers past it are not built.

Per image (``HD transform``, order "sub, glb"): the tiles' pooled g x g grids are laid out
as one (rows * g) x (cols * g) grid, cut to the rows/columns that hold image, each row ended
by the ``sub`` separator; then the ``glb`` separator; then the global view's g x g grid, each
row ended by ``sub``. That sequence is projected (up, GELU, down).

Module names are transformers 5's (``img_processor.*``, ``global_img_feature_extensor``,
``sub_img_feature_extensor``, ``img_projection_up/down``); the family maps Microsoft's
(``glb_GN``, ``sub_GN``, ``img_projection.0/2``) onto them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.attention_backends import EncoderBatch
from mistralrs_core.layers.linear import Embedding, Linear

from mistralrs_arch_vision.towers.siglip import PatchEmbedding, SiglipTowerConfig
from mistralrs_arch_vision.towers.vit import ViTEncoder

# Microsoft's original config.json names no vision settings: its tower is SigLIP-so400m at 448.
SO400M_448 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=448, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def masked_position_ids(mask: torch.Tensor, per_side: int) -> torch.Tensor:
    """[N, m*m] position-table cells of N crops with patch masks ``mask`` [N, m, m] (bool).

    As the reference: the fraction i * (1 / h) in float32 over all m rows (h = the crop's image
    rows), clamped below 1 and bucketed against the boundaries k / per_side; padding is cell 0."""
    n, m, _ = mask.shape
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side, device=mask.device)
    rows = mask[:, :, 0].sum(dim=1)
    cols = mask[:, 0, :].sum(dim=1)
    idx = torch.arange(m, device=mask.device, dtype=torch.float32)
    fh = (idx[None, :] * (1.0 / rows)[:, None]).clamp(max=1.0 - 1e-6)
    fw = (idx[None, :] * (1.0 / cols)[:, None]).clamp(max=1.0 - 1e-6)
    bh = torch.bucketize(fh, boundaries, right=True)
    bw = torch.bucketize(fw, boundaries, right=True)
    ids = (bh[:, :, None] * per_side + bw[:, None, :]).reshape(n, -1)
    return torch.where(mask.reshape(n, -1), ids, torch.zeros_like(ids))


class MaskedSiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg.num_channels, cfg.hidden_size, cfg.patch_size)
        self.position_embedding = Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S], mask [N, S/p, S/p] bool -> [N, (S/p)^2, D]."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixels.to(dtype)).flatten(2).transpose(1, 2)
        ids = masked_position_ids(mask, self.cfg.patches_per_side)
        return patches + self.position_embedding(ids).to(patches.dtype)


class Phi4MMVisionTower(nn.Module):
    """The SigLIP encoder up to ``feature_layer`` (checkpoint names ``embeddings.*``,
    ``encoder.layers.N.*``; the unused ``post_layernorm``/``head`` and later layers are dropped)."""

    def __init__(self, cfg: SiglipTowerConfig, feature_layer: int = -2):
        super().__init__()
        total = cfg.num_hidden_layers
        n = feature_layer if feature_layer >= 0 else total + 1 + feature_layer
        if not 0 <= n <= total:
            raise ValueError(f"vision feature layer {feature_layer} outside [-{total + 1}, {total}]")
        self.cfg, self.num_layers = cfg, n
        self.embeddings = MaskedSiglipEmbeddings(cfg)
        self.encoder = ViTEncoder(n, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                                  cfg.layer_norm_eps, cfg.hidden_act)

    def map_weight_name(self, name: str) -> str | None:
        if name.startswith(("post_layernorm.", "head.")):
            return None
        if name.startswith("encoder.layers.") and int(name.split(".", 3)[2]) >= self.num_layers:
            return None
        return name

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # A crop with no image patch cannot occur for the processor's layouts short of the
        # dynamic_hd cap; its rows are cut away later, so it attends over all its patches
        # rather than over none (which would be NaN).
        mask = mask.bool()
        empty = ~mask.flatten(1).any(dim=1)
        if empty.any():
            mask = mask.clone()
            mask[empty] = True
        x = self.embeddings(pixels, mask)
        keys = mask.flatten(1)
        batch = EncoderBatch.padded(None if bool(keys.all()) else keys)
        for layer in self.encoder.layers:
            x = layer(x, batch)
        return x


class Phi4MMImageEmbedding(nn.Module):
    """Tower + pooling + HD layout + projection (transformers' ``image_embed``)."""

    def __init__(self, cfg: SiglipTowerConfig, text_hidden: int, feature_layer: int = -2, crop_size: int = 448):
        super().__init__()
        if cfg.image_size != crop_size:
            raise ValueError(f"vision config: image_size {cfg.image_size} differs from crop_size {crop_size}")
        self.crop_size = crop_size
        self.img_processor = Phi4MMVisionTower(cfg, feature_layer)
        d = cfg.hidden_size
        self.dim = d
        side = cfg.patches_per_side
        self.pad_odd = side % 2 == 1              # the reference reflection-pads an odd grid
        self.grid = (side + 1) // 2
        self.global_img_feature_extensor = nn.Parameter(torch.empty(1, 1, d, device="meta"), requires_grad=False)
        self.sub_img_feature_extensor = nn.Parameter(torch.empty(1, 1, 1, d, device="meta"), requires_grad=False)
        self.img_projection_up = Linear(d, text_hidden, bias=True)
        self.img_projection_down = Linear(text_hidden, text_hidden, bias=True)

    def map_weight_name(self, name: str) -> str | None:
        if name.startswith("img_processor."):
            inner = self.img_processor.map_weight_name(name[len("img_processor."):])
            return None if inner is None else "img_processor." + inner
        return name

    def pooled(self, pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] crops -> [N, g, g, D] after the tower and the 2x2 average pooling."""
        x = self.img_processor(pixels, masks)
        n, _, d = x.shape
        side = self.img_processor.cfg.patches_per_side
        x = x.view(n, side, side, d).permute(0, 3, 1, 2)
        if self.pad_odd:
            x = F.pad(x, (0, 1, 0, 1), mode="reflect")
        x = F.avg_pool2d(x, kernel_size=2, stride=2)
        return x.permute(0, 2, 3, 1)

    def layout(self, feats: torch.Tensor, masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One image's pooled crops [1 + tiles, g, g, D] -> its token rows [T, D] (before projection)."""
        g, d = self.grid, self.dim
        rows, cols = size[0] // self.crop_size, size[1] // self.crop_size
        sub = self.sub_img_feature_extensor.to(feats.dtype).reshape(1, d)
        glob = torch.cat([feats[0], sub.expand(g, 1, d)], dim=1).reshape(-1, d)
        tiles = feats[1:1 + rows * cols].reshape(rows, cols, g, g, d).transpose(1, 2).reshape(rows * g, cols * g, d)
        kept = masks[1:1 + rows * cols, 0::2, 0::2].reshape(rows, cols, g, g).transpose(1, 2).reshape(rows * g, cols * g)
        useful_h, useful_w = int(kept[:, 0].sum()), int(kept[0, :].sum())
        tiles = tiles[:useful_h, :useful_w]
        tiles = torch.cat([tiles, sub.expand(useful_h, 1, d)], dim=1).reshape(-1, d)
        glb = self.global_img_feature_extensor.to(feats.dtype).reshape(1, d)
        return torch.cat([tiles, glb, glob])

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        return self.img_projection_down(F.gelu(self.img_projection_up(rows)))

    def forward(self, images: list) -> list[torch.Tensor]:
        """Processed images (``Phi4MMImage``) -> each one's [num_tokens, text hidden]; every crop
        of every image runs through the tower in one batch."""
        device, dtype = self.img_projection_up.weight.device, self.img_projection_up.weight.dtype
        pixels = torch.cat([im.pixels for im in images]).to(device=device, dtype=dtype)
        masks = torch.cat([im.masks for im in images]).to(device)
        pooled = self.pooled(pixels, masks)
        out, k = [], 0
        for im in images:
            n = im.pixels.shape[0]
            rows = self.layout(pooled[k:k + n], im.masks.to(device), im.size)
            if rows.shape[0] != im.num_tokens:
                raise ValueError(f"image: the encoder made {rows.shape[0]} rows for a span of {im.num_tokens} "
                                 "tokens (the processor's crop size or patch differs from the tower's)")
            out.append(self.project(rows))
            k += n
        return out
