"""Gemma 3n's image processor: Pillow + torch, equal to transformers' PIL-path processor.

transformers maps Gemma 3n to the SigLIP processor: every image is converted to RGB, resized
to one fixed size with Pillow (no aspect ratio kept, no crops), rescaled and, if configured,
normalised. The released ``preprocessor_config.json`` asks for 768x768, bilinear, and no
normalisation (MobileNetV5 takes pixels in [0, 1]). Each step runs in the reference's dtype
(resize on uint8, rescale in float64 then float32, normalise in float32), so the pixel values
are equal, not merely close.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from mistralrs_arch_vision.inputs import to_rgb
from mistralrs_arch_vision.processors.pixels import model_pixels

# transformers' IMAGENET_STANDARD_MEAN/STD, SigLIP's class defaults.
_STANDARD = (0.5, 0.5, 0.5)


def _channels(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"preprocessor_config.json: {name} must have 3 entries (RGB), got {len(value)}")
    return value


@dataclass
class Gemma3nImageProcessor:
    """Defaults are the reference class's (``SiglipImageProcessorPil``), so a
    ``preprocessor_config.json`` that omits a key, or sets it null, reads the same."""
    size: tuple[int, int] = (224, 224)  # (height, width)
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
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
        h, w = self.size
        if h <= 0 or w <= 0:
            raise ValueError(f"preprocessor_config.json: size must be positive, got {self.size}")
        # float32, as the reference builds its mean/std arrays in the image's dtype.
        self._norm = (torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1),
                      torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1))

    @classmethod
    def from_hf(cls, config: dict) -> "Gemma3nImageProcessor":
        """From ``preprocessor_config.json`` (Gemma 3n keeps the audio feature extractor's
        keys in the same file; those are ignored here)."""
        kwargs = {}
        for name in cls.__dataclass_fields__:
            if name.startswith("_") or config.get(name) is None:
                continue
            kwargs[name] = config[name]
        size = kwargs.get("size")
        if isinstance(size, dict):
            if not ("height" in size and "width" in size):
                raise ValueError(f"preprocessor_config.json: Gemma 3n wants size {{height, width}}, got {size}")
            kwargs["size"] = (int(size["height"]), int(size["width"]))
        elif isinstance(size, int):
            kwargs["size"] = (size, size)
        elif size is not None:
            kwargs["size"] = tuple(int(s) for s in size)
        return cls(**kwargs)

    def to_pixels(self, image) -> torch.Tensor:
        """One image (Pillow or HWC uint8 array) -> [3, H, W] float32 model input."""
        if self.do_convert_rgb:
            image = to_rgb(image)
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if image.mode != "RGB":
            raise ValueError(f"image mode {image.mode!r} needs do_convert_rgb (the model reads 3 channels)")
        if self.do_resize:
            h, w = self.size
            image = image.resize((w, h), resample=self.resample)
        return model_pixels(image, self.rescale_factor if self.do_rescale else None,
                            self._norm if self.do_normalize else None)

    def __call__(self, images) -> torch.Tensor:
        """A list of images (or one) -> pixel_values [N, 3, H, W] float32, one batch for
        the tower."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixels = [self.to_pixels(image) for image in images]
        shapes = {tuple(p.shape) for p in pixels}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)} cannot form one batch "
                             "(do_resize is off)")
        return torch.stack(pixels)
