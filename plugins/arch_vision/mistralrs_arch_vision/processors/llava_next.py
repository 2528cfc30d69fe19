"""LLaVa-NeXT's "anyres" preprocessing and the arithmetic the model shares with it.

An image is fitted into the best of ``image_grid_pinpoints`` (a list of (height, width)
canvases, multiples of the tower's input size): resized keeping its aspect ratio, centred on
a zero canvas, and cut into tower-sized tiles, row-major. A squashed whole-image "base" tile
comes first. Every tile then takes CLIP's own steps (``CLIPImageProcessor``), so the
numerics are the CLIP processor's: Pillow resizes the uint8 image, padding is uint8 zeros.

The model later drops the feature rows/columns that only saw padding and ends each remaining
row with a newline vector; ``anyres_token_count`` is that arithmetic, shared by the processor
(placeholder count) and the model (which rows it keeps), so the two cannot disagree.
"""
from __future__ import annotations

import math

import attrs
import numpy as np
import torch
from PIL import Image

from mistralrs_arch_vision.processors.clip import _RESAMPLE, CLIPImageProcessor

# transformers' LlavaNextImageProcessor default canvases (llava-v1.6 at 336 px tiles).
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The canvas that keeps the most of the image's pixels once fitted inside it (capped
    at the original count: upscaling gains nothing), ties going to the least wasted area;
    the first such canvas in list order wins."""
    best, best_kept, best_waste = None, 0, math.inf
    for ch, cw in pinpoints:
        scale = min(cw / width, ch / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = ch * cw - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (ch, cw), kept, waste
    return best


def fitted_size(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled to touch the canvas on its tighter side; the
    other side rounds up (never past the canvas), as the reference computes it."""
    ch, cw = canvas
    sw, sh = cw / width, ch / height
    if sw < sh:
        return min(math.ceil(height * sw), ch), cw
    return ch, min(math.ceil(width * sh), cw)


def unpadded_window(height: int, width: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1): the part of a ``rows`` x ``cols`` feature grid covering the
    image itself rather than the canvas padding. The padding is taken symmetrically, so an
    odd remainder keeps one padded line."""
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return pad, rows - pad, 0, cols
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return 0, rows, pad, cols - pad


def anyres_token_count(height: int, width: int, pinpoints, tile: int, per_side: int) -> int:
    """Feature rows for a ``height`` x ``width`` image: the base tile's ``per_side**2``, then
    the unpadded grid with one newline per row."""
    ch, cw = best_resolution(height, width, pinpoints)
    r0, r1, c0, c1 = unpadded_window(height, width, ch // tile * per_side, cw // tile * per_side)
    return per_side * per_side + (r1 - r0) * (c1 - c0 + 1)


def pinpoints_of(value, tile: int) -> tuple[tuple[int, int], ...]:
    points = tuple((int(h), int(w)) for h, w in (value or DEFAULT_PINPOINTS))
    bad = [p for p in points if p[0] % tile or p[1] % tile or min(p) <= 0]
    if bad:
        raise ValueError(f"image_grid_pinpoints: {bad} are not positive multiples of the {tile} px tile")
    return points


@attrs.frozen
class AnyResPixels:
    """One image's encoder input: every tile (the base first) and its original size."""
    tiles: torch.Tensor              # [1 + grid tiles, 3, tile, tile]
    image_size: tuple[int, int]      # (height, width) before any resize


@attrs.frozen
class LlavaNextImageProcessor:
    clip: CLIPImageProcessor
    pinpoints: tuple[tuple[int, int], ...]

    @property
    def tile(self) -> int:
        # The reference cuts the canvas into crop-height squares (whether or not it crops).
        return self.clip.crop_size[0]

    @classmethod
    def from_config(cls, cfg: dict) -> "LlavaNextImageProcessor":
        clip = CLIPImageProcessor.from_config(cfg)
        if clip.crop_size[0] != clip.crop_size[1]:
            raise ValueError(f"preprocessor_config.json: crop_size {clip.crop_size} is not square")
        return cls(clip, pinpoints_of(cfg.get("image_grid_pinpoints"), clip.crop_size[0]))

    def tile_images(self, image: Image.Image) -> list[Image.Image]:
        """The base image, then the canvas tiles row-major (uint8 RGB images)."""
        resample = _RESAMPLE.get(self.clip.resample, Image.BICUBIC)
        width, height = image.size
        canvas = best_resolution(height, width, self.pinpoints)
        fh, fw = fitted_size(height, width, canvas)
        fitted = np.asarray(image.resize((fw, fh), resample))
        padded = np.zeros((canvas[0], canvas[1], 3), dtype=np.uint8)
        top, left = (canvas[0] - fh) // 2, (canvas[1] - fw) // 2
        padded[top:top + fh, left:left + fw] = fitted
        t = self.tile
        tiles = [Image.fromarray(padded[y:y + t, x:x + t])
                 for y in range(0, canvas[0], t) for x in range(0, canvas[1], t)]
        edge = self.clip.shortest_edge
        return [image.resize((edge, edge), resample)] + tiles

    def __call__(self, image: Image.Image) -> AnyResPixels:
        if image.mode != "RGB":
            image = image.convert("RGB")
        tiles = torch.stack([self.clip(t) for t in self.tile_images(image)])
        return AnyResPixels(tiles, (image.size[1], image.size[0]))
