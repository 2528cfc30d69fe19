"""Idefics3's image processor: Pillow + torch, equal to transformers' PIL-path processor.

Per image: convert to RGB, resize so the longest edge is ``size.longest_edge`` (the short
edge rounded up to even), then with image splitting resize both edges up to multiples of
the tile size ``max_image_size.longest_edge``, cut that into row-major tiles and append the
whole image resized to one tile (the "global" image); without splitting the image is
resized to one tile. Every resize runs in Pillow on uint8 pixels (LANCZOS by default), as
the reference's does, so rescaling (float64, then float32) and normalising (float32) give
bit-equal pixel values.

Every tile is exactly tile x tile pixels, so the reference's padding to the batch's
largest image never pads a real tile: its ``pixel_attention_mask`` is all ones for every
tile this processor yields, and none is returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mistralrs_arch_vision.inputs import to_rgb
from mistralrs_arch_vision.processors.pixels import model_pixels

_STANDARD = (0.5, 0.5, 0.5)      # transformers' IMAGENET_STANDARD_MEAN/STD, the class defaults
# The reference's absolute cap on an image's longest edge after the first resize.
_MAX_EDGE = 4096


@dataclass
class Idefics3Tiles:
    """One image's model input: ``pixels`` [rows * cols + 1, 3, tile, tile] float32 (the
    tiles row-major, then the global image), or [1, 3, tile, tile] when the image was not
    split (``rows == cols == 0``, as the reference reports it)."""
    pixels: torch.Tensor
    rows: int
    cols: int


def _channels(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 entries (RGB), got {len(value)}")
    return value


def _longest_edge(value, name: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and value.get("longest_edge"):
        return int(value["longest_edge"])
    raise ValueError(f"preprocessor_config.json: {name} must be {{longest_edge: N}}, got {value!r}")


def longest_edge_size(width: int, height: int, longest: int) -> tuple[int, int]:
    """(width, height) with the longest edge at ``longest`` (up- or down-scaled), the other
    truncated then rounded up to even, then capped at 4096 a side (the reference's rule)."""
    if width >= height:
        w, h = longest, int(longest / (width / height))
        h += h % 2
    else:
        h, w = longest, int(longest * (width / height))
        w += w % 2
    w, h = max(w, 1), max(h, 1)
    aspect = w / h
    if w >= h and w > _MAX_EDGE:
        w, h = _MAX_EDGE, int(_MAX_EDGE / aspect)
    elif h > w and h > _MAX_EDGE:
        h, w = _MAX_EDGE, int(_MAX_EDGE * aspect)
    return max(w, 1), max(h, 1)


def tile_multiple_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """(width, height) rounded up to whole tiles; the short edge is first scaled with the
    long one (truncated), as the reference does before rounding it up."""
    aspect = width / height
    if width >= height:
        w = math.ceil(width / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(height / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return w, h


@dataclass
class Idefics3ImageProcessor:
    """Defaults are the reference class's, so a ``preprocessor_config.json`` that omits a key
    reads the same."""
    longest_edge: int = 4 * 364           # size.longest_edge
    tile: int = 364                       # max_image_size.longest_edge
    resample: int = Image.Resampling.LANCZOS
    do_resize: bool = True
    do_image_splitting: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _STANDARD
    image_std: tuple[float, float, float] = _STANDARD
    do_convert_rgb: bool = True
    _norm: tuple = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.image_mean = _channels(self.image_mean, "image_mean")
        self.image_std = _channels(self.image_std, "image_std")
        self.resample = Image.Resampling(int(self.resample))
        self._norm = (torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1),
                      torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1))

    @classmethod
    def from_hf(cls, config: dict) -> "Idefics3ImageProcessor":
        """From ``preprocessor_config.json``; null values mean the default."""
        kwargs = {k: config[k] for k in ("resample", "do_resize", "do_image_splitting", "do_rescale",
                                         "rescale_factor", "do_normalize", "image_mean", "image_std",
                                         "do_convert_rgb") if config.get(k) is not None}
        if config.get("size") is not None:
            kwargs["longest_edge"] = _longest_edge(config["size"], "size")
        if config.get("max_image_size") is not None:
            kwargs["tile"] = _longest_edge(config["max_image_size"], "max_image_size")
        return cls(**kwargs)

    def _resize(self, image: Image.Image, width: int, height: int) -> Image.Image:
        # Pillow itself returns a plain copy for an unchanged size, so skipping is exact.
        return image if image.size == (width, height) else image.resize((width, height), resample=self.resample)

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        """One tile -> [3, tile, tile] float32."""
        return model_pixels(image, self.rescale_factor if self.do_rescale else None,
                            self._norm if self.do_normalize else None)

    def __call__(self, image) -> Idefics3Tiles:
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if self.do_resize:
            image = self._resize(image, *longest_edge_size(*image.size, self.longest_edge))
        t = self.tile
        if not self.do_image_splitting:
            return Idefics3Tiles(self.to_pixels(self._resize(image, t, t))[None], 0, 0)
        image = self._resize(image, *tile_multiple_size(*image.size, t))
        w, h = image.size
        if w <= t and h <= t:
            return Idefics3Tiles(self.to_pixels(image)[None], 0, 0)
        rows, cols = h // t, w // t
        tiles = [image.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
        tiles.append(self._resize(image, t, t))
        return Idefics3Tiles(torch.stack([self.to_pixels(x) for x in tiles]), rows, cols)
