"""Gemma 3's image processor: Pillow + torch, equal to transformers' PIL-path processor.

Per image: convert to RGB (transparency composited onto white), optionally pan-and-scan
(crops of an elongated image, taken from the original pixels), then each of the original and
its crops is resized with Pillow on uint8 pixels, rescaled in float64 and cast to float32,
and normalised in float32: the same operations, in the same dtypes, as the reference, so the
pixel values are equal, not merely close.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mistralrs_arch_vision.inputs import to_rgb
from mistralrs_arch_vision.processors.pixels import model_pixels

# transformers' IMAGENET_STANDARD_MEAN/STD, the class defaults of Gemma 3's processor.
_STANDARD = (0.5, 0.5, 0.5)


@dataclass
class Gemma3ImageInputs:
    """What the processor gives the model.

    ``pixel_values`` [sum(1 + num_crops), 3, H, W] float32: for each image, the whole image
    followed by its crops; ``num_crops[i]``: how many crops image i has (0 without
    pan-and-scan), which the prompt builder needs to place the extra image tokens."""
    pixel_values: torch.Tensor
    num_crops: list[int]


def _channels(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"{name} must have 3 entries (RGB), got {len(value)}")
    return value


@dataclass
class Gemma3ImageProcessor:
    """Defaults are the reference class's (a ``preprocessor_config.json`` that omits a key
    reads the same); the pan-and-scan numbers default to Gemma 3's released configs, which the
    reference needs spelled out whenever pan-and-scan is on.

    One deliberate difference: a null ``do_convert_rgb`` (as the released configs have) means
    convert here. The reference then skips conversion and fails on any non-RGB image (its
    mean/std have three channels), so the two agree wherever the reference gives an answer."""
    size: tuple[int, int] = (224, 224)  # (height, width)
    resample: int = Image.Resampling.BILINEAR
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = _STANDARD
    image_std: tuple[float, float, float] = _STANDARD
    do_convert_rgb: bool = True
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2
    _norm: tuple = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.image_mean = _channels(self.image_mean, "image_mean")
        self.image_std = _channels(self.image_std, "image_std")
        self.resample = Image.Resampling(int(self.resample))
        # float32, as the reference builds its mean/std arrays in the image's dtype.
        self._norm = (torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1),
                      torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1))

    @classmethod
    def from_hf(cls, config: dict) -> "Gemma3ImageProcessor":
        """From ``preprocessor_config.json``; null values mean the default."""
        kwargs = {}
        for name in cls.__dataclass_fields__:
            if name.startswith("_") or config.get(name) is None:
                continue
            kwargs[name] = config[name]
        size = kwargs.get("size")
        if isinstance(size, dict):
            if not ("height" in size and "width" in size):
                raise ValueError(f"preprocessor_config.json: Gemma 3 wants size {{height, width}}, got {size}")
            kwargs["size"] = (int(size["height"]), int(size["width"]))
        elif isinstance(size, int):
            kwargs["size"] = (size, size)
        return cls(**kwargs)

    # ------------------------------------------------------------------ pan and scan
    def crop_boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each pan-and-scan crop, row-major; [] when the image
        is not elongated enough or the crops would be smaller than the minimum."""
        min_crop = self.pan_and_scan_min_crop_size
        if width >= height:
            if width / height < self.pan_and_scan_min_ratio_to_activate:
                return []
            # As many crops as the aspect ratio rounds (half up) to, each at least min_crop
            # wide, clamped to [2, max_num_crops].
            n_w = min(int(math.floor(width / height + 0.5)), int(math.floor(width / min_crop)))
            n_w, n_h = min(self.pan_and_scan_max_num_crops, max(2, n_w)), 1
        else:
            if height / width < self.pan_and_scan_min_ratio_to_activate:
                return []
            n_h = min(int(math.floor(height / width + 0.5)), int(math.floor(height / min_crop)))
            n_w, n_h = 1, min(self.pan_and_scan_max_num_crops, max(2, n_h))
        crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
        if min(crop_w, crop_h) < min_crop:
            return []
        # The last crop may be narrower (ceil above): clip it to the image rather than pad.
        return [(x, y, min(x + crop_w, width), min(y + crop_h, height))
                for y in range(0, crop_h * n_h, crop_h) for x in range(0, crop_w * n_w, crop_w)]

    def pan_and_scan(self, image: Image.Image) -> list[Image.Image]:
        return [image.crop(box) for box in self.crop_boxes(*image.size)]

    # ------------------------------------------------------------------ pixels
    def to_pixels(self, image: Image.Image) -> torch.Tensor:
        """One image -> [3, H, W] float32 model input."""
        if self.do_resize:
            h, w = self.size
            image = image.resize((w, h), resample=self.resample)
        return model_pixels(image, self.rescale_factor if self.do_rescale else None,
                            self._norm if self.do_normalize else None)

    def __call__(self, images, do_pan_and_scan: bool | None = None) -> Gemma3ImageInputs:
        """Process a list of images (or one); ``do_pan_and_scan`` overrides the config."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        pas = self.do_pan_and_scan if do_pan_and_scan is None else do_pan_and_scan
        pixels, num_crops = [], []
        for image in images:
            if self.do_convert_rgb:
                image = to_rgb(image)
            elif isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            crops = self.pan_and_scan(image) if pas else []
            num_crops.append(len(crops))
            pixels.extend(self.to_pixels(im) for im in [image, *crops])
        shapes = {tuple(p.shape) for p in pixels}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)} cannot form one batch "
                             "(do_resize is off)")
        return Gemma3ImageInputs(torch.stack(pixels), num_crops)
