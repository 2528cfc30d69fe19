"""Idefics2's image processor: Pillow + torch, equal to transformers' PIL-path processor.

Per image: convert to RGB, optionally split into its four quadrants followed by the whole
image (``do_image_splitting``; crops are cut from the original pixels *before* resizing),
resize each to the shortest/longest-edge rule below with Pillow on uint8 pixels, rescale
(float64, then float32) and normalise (float32). Each crop keeps its own size: the reference
pads a batch to its largest image with a pixel mask the model then reads back, while here
every crop is its own encoder input and the tower pads (and masks) at encode time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mistralrs_arch_vision.inputs import to_rgb
from mistralrs_arch_vision.processors.pixels import model_pixels

# transformers' IMAGENET_STANDARD_MEAN/STD, the reference class's defaults.
_STANDARD = (0.5, 0.5, 0.5)


def _channels(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 entries (RGB), got {len(value)}")
    return value


def resized_size(height: int, width: int, shortest: int, longest: int) -> tuple[int, int]:
    """(height, width) after Idefics2's resize: the longer side capped at ``longest`` (the
    other scaled with it, truncated), then EACH side raised to at least ``shortest``
    independently, so a small image is stretched to a square of ``shortest``, not scaled."""
    aspect = width / height
    if width >= height and width > longest:
        width, height = longest, int(longest / aspect)
    elif height > width and height > longest:
        height, width = longest, int(longest * aspect)
    return max(height, shortest), max(width, shortest)


@dataclass
class Idefics2ImageProcessor:
    """Defaults are the reference class's (a ``preprocessor_config.json`` that omits a key
    reads the same). ``size`` is {shortest_edge, longest_edge} or {height, width}."""
    size: dict = field(default_factory=lambda: {"shortest_edge": 378, "longest_edge": 980})
    resample: int = Image.Resampling.BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _STANDARD
    image_std: tuple[float, float, float] = _STANDARD
    do_convert_rgb: bool = True
    do_image_splitting: bool = False
    _norm: tuple = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.image_mean = _channels(self.image_mean, "image_mean")
        self.image_std = _channels(self.image_std, "image_std")
        self.resample = Image.Resampling(int(self.resample))
        size = dict(self.size)
        if not ({"shortest_edge", "longest_edge"} <= size.keys() or {"height", "width"} <= size.keys()):
            raise ValueError(f"preprocessor_config.json: Idefics2 wants size {{shortest_edge, longest_edge}} or "
                             f"{{height, width}}, got {self.size}")
        self.size = size
        self._norm = (torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1),
                      torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1))

    @classmethod
    def from_hf(cls, config: dict) -> "Idefics2ImageProcessor":
        """From ``preprocessor_config.json``; null values mean the default."""
        kwargs = {name: config[name] for name in cls.__dataclass_fields__
                  if not name.startswith("_") and config.get(name) is not None}
        return cls(**kwargs)

    @property
    def crops_per_image(self) -> int:
        return 5 if self.do_image_splitting else 1

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        s = self.size
        if "shortest_edge" in s and "longest_edge" in s:
            return resized_size(height, width, int(s["shortest_edge"]), int(s["longest_edge"]))
        return int(s["height"]), int(s["width"])

    def crops(self, image: Image.Image) -> list[Image.Image]:
        """The four quadrants (row-major; the right/bottom ones take the odd pixel), then the
        whole image; just the image without splitting."""
        if not self.do_image_splitting:
            return [image]
        w, h = image.size
        mw, mh = w // 2, h // 2
        return [image.crop(box) for box in ((0, 0, mw, mh), (mw, 0, w, mh), (0, mh, mw, h), (mw, mh, w, h))] + [image]

    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        """One crop -> [3, H, W] float32 model input."""
        if self.do_resize:
            h, w = self.target_size(image.height, image.width)
            image = image.resize((w, h), resample=self.resample)
        return model_pixels(image, self.rescale_factor if self.do_rescale else None,
                            self._norm if self.do_normalize else None)

    def __call__(self, image) -> list[torch.Tensor]:
        """One image -> its crops' pixels [3, H_k, W_k] (the whole image last when split)."""
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return [self.to_pixels(c) for c in self.crops(image)]
