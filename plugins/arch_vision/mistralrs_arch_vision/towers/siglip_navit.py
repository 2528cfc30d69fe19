"""SigLIP at each image's own resolution (Idefics2's vision model): the ``towers.siglip``
encoder, fed patches of images of any size, with learned positions looked up by *fractional*
coordinates.

The position table still covers ``image_size / patch_size`` patches a side; an image of
h x w patches gives patch (i, j) the table cell of the bucket its fraction (i / h, j / w)
falls in, so an image of any shape spreads over the whole table (NaViT's "Patch n' Pack").
Images of different sizes run as one padded batch whose key mask hides the padding, which
is what the reference's ``patch_attention_mask`` does; the caller gets the mask back to
hide the padding from whatever reads the patches next (the perceiver resampler).

Module and checkpoint names equal ``SiglipVisionTower``'s (``embeddings.patch_embedding``,
``embeddings.position_embedding``, ``encoder.layers.N.*``, ``post_layernorm``).
"""
from __future__ import annotations

import torch

from mistralrs_core.layers.attention_backends import EncoderBatch

from mistralrs_arch_vision.towers.siglip import SiglipEmbeddings, SiglipTowerConfig, SiglipVisionTower


def fractional_position_ids(rows: int, cols: int, per_side: int) -> torch.Tensor:
    """[rows * cols] row-major position-table indices of an image of rows x cols patches.

    Computed in float32 as the reference does (the fraction i * (1 / n), clamped just below 1,
    bucketed against the boundaries k / per_side): a different rounding would move a patch
    whose fraction sits on a boundary into the neighbouring cell."""
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)

    def buckets(n: int) -> torch.Tensor:
        frac = torch.arange(n, dtype=torch.float32) * (1.0 / torch.tensor(n))
        return torch.bucketize(frac.clamp(max=1.0 - 1e-6), boundaries, right=True)

    return (buckets(rows)[:, None] * per_side + buckets(cols)[None, :]).flatten()


class FractionalSiglipEmbeddings(SiglipEmbeddings):
    """SigLIP's patch embedding and position table, positions by fractional coordinates."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """One image [C, H, W] -> [(H // p) * (W // p), D]; a partial last row/column of
        pixels is dropped, as the strided convolution (and the reference's mask) drops it."""
        p = self.cfg.patch_size
        rows, cols = image.shape[-2] // p, image.shape[-1] // p
        if rows == 0 or cols == 0:
            raise ValueError(f"an image of {tuple(image.shape[-2:])} pixels holds no {p}x{p} patch")
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(image[None].to(dtype))[0].flatten(1).T
        ids = fractional_position_ids(rows, cols, self.cfg.patches_per_side).to(patches.device)
        return patches + self.position_embedding(ids).to(patches.dtype)


class NaViTSiglipTower(SiglipVisionTower):
    """SigLIP encoder over a list of images of any sizes (Idefics2). No pooling head."""

    def __init__(self, cfg: SiglipTowerConfig, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, use_head=False, dtype=dtype)
        self.embeddings = FractionalSiglipEmbeddings(cfg)

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Last hidden state (after ``post_layernorm``) of each image.

        Args:
            images: [C, H, W] each, any sizes.
        Returns:
            (states [B, S, D] with image b's patches in rows [0, n_b) in raster order,
            key_mask [B, S] True on those rows; None when every image has S patches).
        """
        if not images:
            raise ValueError("no images")
        rows = [self.embeddings(im) for im in images]
        lengths = [r.shape[0] for r in rows]
        s = max(lengths)
        if all(n == s for n in lengths):
            x, mask = torch.stack(rows), None
        else:
            x = rows[0].new_zeros(len(rows), s, rows[0].shape[-1])
            for b, r in enumerate(rows):
                x[b, :r.shape[0]] = r
            mask = torch.arange(s, device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
        batch = EncoderBatch.padded(mask)
        for layer in self.encoder.layers:
            x = layer(x, batch)
        return self.post_layernorm(x), mask
