"""Pixtral's image preprocessing (Mistral 3): no fixed resolution. An image is shrunk (never
grown past) to fit ``size.longest_edge`` keeping its aspect ratio, then each side is rounded
up to a multiple of the token unit (patch size x spatial merge) and the image is resized to
exactly that with Pillow; then rescale and normalise.

Numerics follow transformers' PIL-path ``PixtralImageProcessorPil``: Pillow resizes the uint8
image, rescaling multiplies in float64 and rounds to float32, normalisation runs in float32,
so the pixel values are equal, not merely close. The prompt side (``image_tokens``) is
``PixtralProcessor``'s: a row of image tokens per token row, each row closed by a break
token, the last one by the end token instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mistralrs_arch_vision.inputs import to_rgb
from mistralrs_arch_vision.processors.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mistralrs_arch_vision.processors.pixels import model_pixels


def _longest_edge(size) -> tuple[int, int]:
    """(max height, max width) from a ``size`` setting."""
    if isinstance(size, int):
        return size, size
    if size.get("longest_edge"):
        return int(size["longest_edge"]), int(size["longest_edge"])
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    raise ValueError(f"preprocessor_config.json: Pixtral wants size {{longest_edge}} or {{height, width}}, "
                     f"got {size}")


@dataclass
class PixtralImageProcessor:
    """``unit`` is the side of one prompt token in pixels: the tower's patch times the
    projector's spatial merge (the reference processor overrides its own ``patch_size`` so)."""
    unit: int = 16
    max_size: tuple[int, int] = (1024, 1024)     # (height, width)
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    _norm: tuple = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.resample = Image.Resampling(int(self.resample))
        self._norm = (torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1),
                      torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1))

    @classmethod
    def from_config(cls, cfg: dict, unit: int) -> "PixtralImageProcessor":
        """From ``preprocessor_config.json``; null values mean the default."""
        kw = {k: cfg[k] for k in ("resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
                                  "do_convert_rgb") if cfg.get(k) is not None}
        for k in ("image_mean", "image_std"):
            if cfg.get(k) is not None:
                kw[k] = tuple(float(v) for v in cfg[k])
        if cfg.get("size") is not None:
            kw["max_size"] = _longest_edge(cfg["size"])
        return cls(unit=unit, **kw)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image is resized to: fit in ``max_size`` (floor), then each side
        up to a multiple of ``unit``; the reference's float arithmetic, step by step."""
        max_h, max_w = self.max_size
        ratio = max(height / max_h, width / max_w)
        if ratio > 1:
            height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
        u = self.unit
        return ((width - 1) // u + 1) * u, ((height - 1) // u + 1) * u

    def __call__(self, image) -> torch.Tensor:
        """One image -> pixel values [3, H, W] float32, H and W multiples of ``unit``."""
        image = to_rgb(image) if self.do_convert_rgb else image
        if self.do_resize:
            image = image.resize(self.resized_size(*image.size), resample=self.resample)
        elif image.width % self.unit or image.height % self.unit:
            # The projector merges whole unit x unit blocks; the reference would fail there.
            raise ValueError(f"image of {image.width} x {image.height} pixels: with do_resize off, sides must be "
                             f"multiples of {self.unit} (patch size x spatial merge)")
        return model_pixels(image, self.rescale_factor if self.do_rescale else None,
                            self._norm if self.do_normalize else None)


def image_tokens(rows: int, cols: int, image: int, row_break: int, end: int) -> list[int]:
    """The prompt tokens of one image of ``rows`` x ``cols`` tokens: each row of ``image``
    tokens closed by ``row_break``, the last row by ``end`` instead."""
    out = []
    for _ in range(rows):
        out += [image] * cols + [row_break]
    out[-1] = end
    return out
