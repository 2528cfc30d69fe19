"""Phi-3-vision's image processor (the "HD transform") and the token arithmetic the model
shares with it; Pillow + torch, no torchvision.

Per image, as the hub's ``Phi3VImageProcessor`` does it:
1. the image is laid landscape (transposed when taller than wide);
2. the largest ``scale`` whose ``scale`` x ``ceil(scale / aspect)`` grid of 336 px crops fits
   in ``num_crops`` is picked, and the image is resized (bilinear, on uint8 pixels) to
   ``scale * 336`` wide, keeping its aspect (height truncated);
3. the height is padded with white to a multiple of 336, the pad split top/bottom;
4. it is transposed back, turned into float32 (divided by 255 in float32) and normalised;
5. a 336 x 336 "global" image is taken from the normalised pixels (bicubic, no antialias)
   and put before the crops (row-major).

The hub pads every image to ``num_crops + 1`` crops with zeros; the padding is never looked
at by the model, so only the real crops are kept here. ``image_size`` is the padded HD size
(height, width), as the hub returns it in ``image_sizes``.
"""
from __future__ import annotations

import math

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mistralrs_arch_vision.inputs import to_rgb
from mistralrs_arch_vision.processors.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

CROP = 336      # the hub hard-codes CLIP ViT-L/14-336's input size


def hd_grid(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(width, height) of the image resized by the HD transform, before the padding; both
    as the hub computes them (integer truncation, float aspect)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_w = int(scale * CROP)
    new_h = int(new_w / ratio)
    return (new_h, new_w) if transposed else (new_w, new_h)


def hd_size(width: int, height: int, num_crops: int) -> tuple[int, int]:
    """(height, width) of the padded HD image: multiples of 336 on both sides."""
    w, h = hd_grid(width, height, num_crops)
    if w >= h:
        return math.ceil(h / CROP) * CROP, w
    return h, math.ceil(w / CROP) * CROP


def image_token_count(height: int, width: int, per_side: int = 12) -> int:
    """Feature rows of an image whose padded HD size is ``height`` x ``width``: every crop's
    ``per_side``**2 merged patches with a separator ending each row, one separator between
    the crops and the global image, then the global image with its row ends. With the hub's
    12 this is its ``(h//336 * w//336 + 1) * 144 + 1 + (h//336 + 1) * 12``."""
    rows, cols = height // CROP, width // CROP
    return rows * per_side * (cols * per_side + 1) + 1 + per_side * (per_side + 1)


@attrs.frozen
class Phi3VPixels:
    """One image's encoder input."""
    crops: torch.Tensor              # [1 + rows * cols, 3, 336, 336]: the global image, then the crops
    image_size: tuple[int, int]      # (height, width) of the padded HD image

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size[0] // CROP, self.image_size[1] // CROP


def _channels(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"preprocessor_config.json: {name} must have 3 entries (RGB), got {len(value)}")
    return value


@attrs.frozen
class Phi3VImageProcessor:
    num_crops: int = 1              # the hub class's default; released configs say 16 or 4
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_config(cls, cfg: dict) -> "Phi3VImageProcessor":
        num_crops = cfg.get("num_crops", 1)
        if not isinstance(num_crops, int) or isinstance(num_crops, bool) or num_crops < 1:
            raise ValueError(f"preprocessor_config.json: num_crops must be a positive integer, got {num_crops!r}")
        return cls(num_crops=num_crops,
                   image_mean=_channels(cfg.get("image_mean") or OPENAI_CLIP_MEAN, "image_mean"),
                   image_std=_channels(cfg.get("image_std") or OPENAI_CLIP_STD, "image_std"))

    def hd_image(self, image: Image.Image) -> Image.Image:
        """Steps 1-3 above on an RGB image: the padded HD image (uint8 RGB)."""
        width, height = image.size
        new_w, new_h = hd_grid(width, height, self.num_crops)
        if new_w < 1 or new_h < 1:
            # The reference fails here too (a zero-sized resize): the aspect ratio is past
            # what 336 px crops can hold.
            raise ValueError(f"image: a {width}x{height} image is too elongated for Phi-3-vision's "
                             f"{self.num_crops} crops of {CROP} px")
        # Transposed, resized, padded and transposed back literally: Pillow resizes in two
        # passes rounding to uint8 in between, so resizing the upright image would differ.
        transposed = width < height
        if transposed:
            image = image.transpose(Image.TRANSPOSE)
            new_w, new_h = new_h, new_w
        resized = np.asarray(image.resize((new_w, new_h), Image.BILINEAR))
        target = math.ceil(new_h / CROP) * CROP
        top = (target - new_h) // 2
        padded = np.full((target, new_w, 3), 255, dtype=np.uint8)
        padded[top:top + new_h] = resized
        out = Image.fromarray(padded)
        return out.transpose(Image.TRANSPOSE) if transposed else out

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """uint8 RGB -> [3, H, W] float32, divided by 255 in float32 and normalised, the
        reference's ``ToTensor`` + ``Normalize``."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32).div(255)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def __call__(self, image: Image.Image) -> Phi3VPixels:
        if image.mode != "RGB":
            image = to_rgb(image)
        hd = self.normalize(self.hd_image(image))
        _, h, w = hd.shape
        glb = F.interpolate(hd[None], size=(CROP, CROP), mode="bicubic", align_corners=False)
        crops = (hd.reshape(3, h // CROP, CROP, w // CROP, CROP).permute(1, 3, 0, 2, 4)
                 .reshape(-1, 3, CROP, CROP))
        return Phi3VPixels(torch.cat([glb, crops]).contiguous(), (h, w))

    def num_tokens(self, width: int, height: int, per_side: int = 12) -> int:
        """Placeholder tokens for an image of ``width`` x ``height`` (before any transform)."""
        return image_token_count(*hd_size(width, height, self.num_crops), per_side)
