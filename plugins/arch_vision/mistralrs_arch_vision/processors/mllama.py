"""Mllama's image preprocessing: pick the tile layout (rows x cols, at most
``max_image_tiles`` tiles) whose canvas needs the smallest upscale (else the smallest
downscale; ties: the smaller canvas), resize to fit it keeping the aspect ratio (never
below one tile per side), pad bottom/right with zeros, rescale, normalize, cut into tiles
and pad to ``max_image_tiles`` with zero tiles.

Pillow resizes the uint8 image and rescaling runs in float64 rounded to float32, as the
reference's PIL path does. A layout's id is its 1-based index in the list of (a, b) with
a * b <= max tiles, a-major (the reference's ``aspect_ratio_ids``).
"""
from __future__ import annotations

import math

import attrs
import numpy as np
import torch
from PIL import Image

from mistralrs_arch_vision.processors.clip import _RESAMPLE

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


def tile_layouts(max_tiles: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def best_layout(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(tile rows, tile cols) of the canvas the image is fitted to."""
    layouts = tile_layouts(max_tiles)
    scales = [min(r * tile / height, c * tile / width) for r, c in layouts]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    candidates = [lay for lay, s in zip(layouts, scales) if s == chosen]
    return min(candidates, key=lambda lay: lay[0] * lay[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """(height, width) after the aspect-preserving resize onto the canvas."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@attrs.frozen
class MllamaPixels:
    pixel_values: torch.Tensor     # [max_tiles, 3, tile, tile]
    aspect_ratio_id: int
    tile_mask: torch.Tensor        # [max_tiles] int64, 1 for the image's tiles
    layout: tuple[int, int]        # (tile rows, tile cols)

    @property
    def num_tiles(self) -> int:
        return self.layout[0] * self.layout[1]


@attrs.frozen
class MllamaImageProcessor:
    tile_size: int = 224
    max_image_tiles: int = 4
    resample: int = 2
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, ...] = IMAGENET_STANDARD_STD

    @classmethod
    def from_config(cls, cfg: dict) -> "MllamaImageProcessor":
        size = cfg.get("size") or {"height": 224, "width": 224}
        if size.get("height") != size.get("width"):
            raise ValueError(f"preprocessor_config.json: Mllama tiles are square, got size {size}")
        if not cfg.get("do_resize", True) or not cfg.get("do_pad", True):
            raise ValueError("preprocessor_config.json: Mllama always resizes and pads")
        return cls(tile_size=int(size["height"]), max_image_tiles=int(cfg.get("max_image_tiles", 4)),
                   resample=int(cfg.get("resample", 2)), do_rescale=bool(cfg.get("do_rescale", True)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(cfg.get("do_normalize", True)),
                   image_mean=tuple(cfg.get("image_mean") or IMAGENET_STANDARD_MEAN),
                   image_std=tuple(cfg.get("image_std") or IMAGENET_STANDARD_STD))

    def __call__(self, image: Image.Image) -> MllamaPixels:
        if image.mode != "RGB":
            image = image.convert("RGB")
        t = self.tile_size
        rows, cols = best_layout(image.height, image.width, self.max_image_tiles, t)
        new_h, new_w = fit_to_canvas(image.height, image.width, rows * t, cols * t, t)
        image = image.resize((new_w, new_h), _RESAMPLE.get(self.resample, Image.BILINEAR))
        canvas = np.zeros((rows * t, cols * t, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = np.asarray(image)
        if self.do_rescale:
            pixels = (canvas.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = canvas.astype(np.float32)
        if self.do_normalize:
            pixels = (pixels - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std,
                                                                                        dtype=np.float32)
        tiles = pixels.reshape(rows, t, cols, t, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, t, t)
        out = np.zeros((self.max_image_tiles, 3, t, t), dtype=np.float32)
        out[:rows * cols] = tiles
        mask = torch.zeros(self.max_image_tiles, dtype=torch.int64)
        mask[:rows * cols] = 1
        layout_id = tile_layouts(self.max_image_tiles).index((rows, cols)) + 1
        return MllamaPixels(torch.from_numpy(out), layout_id, mask, (rows, cols))
