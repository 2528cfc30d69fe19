"""CLIP's image preprocessing: resize the shortest edge (bicubic), center crop, rescale,
normalize; read from a ``preprocessor_config.json``.

Written with Pillow + numpy so it runs where torchvision does not. Numerics follow the
reference's PIL path: Pillow resizes the uint8 image, the crop pads with zeros when the
image is smaller than the crop, rescaling multiplies in float64 and rounds to float32, and
normalisation runs in float32.
"""
from __future__ import annotations

import attrs
import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL's resampling filter numbers, as preprocessor configs store them.
_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX,
             5: Image.HAMMING}


def _edge(size, key: str, default: int) -> int:
    if size is None:
        return default
    if isinstance(size, int):
        return size
    return int(size.get(key) or size.get("height") or default)


def _crop(size, default: int) -> tuple[int, int]:
    if size is None:
        return default, default
    if isinstance(size, int):
        return size, size
    return int(size["height"]), int(size["width"])


@attrs.frozen
class CLIPImageProcessor:
    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)          # (height, width)
    resample: int = 3
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_config(cls, cfg: dict) -> "CLIPImageProcessor":
        size = cfg.get("size")
        if isinstance(size, dict) and "shortest_edge" not in size and "height" in size:
            raise ValueError("preprocessor_config.json: size {height, width} (a fixed resize) is not the CLIP "
                             "processor's shortest-edge resize")
        return cls(
            shortest_edge=_edge(size, "shortest_edge", 224),
            crop_size=_crop(cfg.get("crop_size"), 224),
            resample=int(cfg.get("resample", 3)),
            do_resize=bool(cfg.get("do_resize", True)),
            do_center_crop=bool(cfg.get("do_center_crop", True)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            image_mean=tuple(cfg.get("image_mean") or OPENAI_CLIP_MEAN),
            image_std=tuple(cfg.get("image_std") or OPENAI_CLIP_STD),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the shortest-edge resize; the long side is truncated, as the
        reference computes it (``int(edge * long / short)``)."""
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> pixel values [3, crop_h, crop_w] (float32)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.do_resize:
            image = image.resize(self.resized_size(*image.size), _RESAMPLE.get(self.resample, Image.BICUBIC))
        pixels = np.asarray(image)                                  # [H, W, 3] uint8
        if self.do_center_crop:
            pixels = center_crop(pixels, *self.crop_size)
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            pixels = pixels.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            pixels = (pixels - mean) / std
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def batch(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self(im) for im in images])


def center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """[H, W, C] -> [crop_h, crop_w, C]; an image smaller than the crop is centred on zeros
    (the pad goes ceil-first on top/left, as the reference places it)."""
    h, w = pixels.shape[:2]
    if h < crop_h or w < crop_w:
        ph, pw = max(crop_h, h), max(crop_w, w)
        top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)
        padded = np.zeros((ph, pw, pixels.shape[2]), dtype=pixels.dtype)
        padded[top:top + h, left:left + w] = pixels
        pixels, h, w = padded, ph, pw
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return pixels[top:top + crop_h, left:left + crop_w]
