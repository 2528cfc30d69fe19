"""Qwen2-VL's image preprocessing (also Qwen2.5-VL's and Qwen3-VL's): dynamic resolution.

An image keeps (about) its own size: each side is rounded to a multiple of ``factor`` (the
tower's patch times the merger's ``merge_size``, so merged tokens tile it exactly), then the
area is pulled into ``[min_pixels, max_pixels]`` keeping the aspect ratio (``smart_resize``).
Pillow resizes the uint8 image to that, rescaling multiplies in float64 and rounds to
float32, normalisation runs in float32 (transformers' PIL path, ``Qwen2VLImageProcessorPil``,
so the pixel values are equal, not merely close).

The tower takes flattened patches rather than an image: one row per ``patch x patch`` patch,
rows ordered merge-block by merge-block (the ``merge x merge`` patches one merged token is
made of are consecutive rows), each row holding channel, time, y, x with the still image
repeated ``temporal_patch_size`` times along time (the patch embedding is a 3-D convolution
built for video). ``grid_thw`` = (1, rows of patches, columns of patches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import attrs
import torch
from PIL import Image

from mistralrs_arch_vision.inputs import to_rgb
from mistralrs_arch_vision.processors.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mistralrs_arch_vision.processors.pixels import model_pixels

#: the reference refuses images whose long side exceeds this many short sides
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width), both multiples of ``factor``, area within ``[min_pixels, max_pixels]``
    where rounding allows, aspect ratio kept as closely as the grid allows. Python's
    ``round`` (half to even) as the reference uses it, so the token counts agree."""
    if min(height, width) <= 0:
        raise ValueError(f"image of {width} x {height} pixels: both sides must be at least 1 pixel")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {width} x {height} pixels: the aspect ratio must be at most "
                         f"{MAX_ASPECT_RATIO}:1 for Qwen2-VL's processor")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@attrs.frozen
class QwenVisionInput:
    """A span's encoder input: ``patches`` [t*h*w, C*tp*p*p] float32 in the order above and
    ``grid_thw`` (t, h, w) in patches."""
    patches: torch.Tensor
    grid_thw: tuple[int, int, int]


def _pixels_setting(cfg: dict, size: dict, new_key: str, old_key: str):
    """min/max pixels: top-level ``min_pixels``/``max_pixels`` win over ``size`` (as the
    reference's constructor lets them), ``size`` may spell them either way."""
    if cfg.get(old_key) is not None:
        return int(cfg[old_key])
    for key in (new_key, old_key):
        if size.get(key) is not None:
            return int(size[key])
    return None


@dataclass
class Qwen2VLImageProcessor:
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
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
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"preprocessor_config.json: {name} must be a positive integer, "
                                 f"got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"preprocessor_config.json: min_pixels ({self.min_pixels}) exceeds max_pixels "
                             f"({self.max_pixels})")
        self._norm = (torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1),
                      torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1))

    @classmethod
    def from_config(cls, cfg: dict, **overrides) -> "Qwen2VLImageProcessor":
        """From ``preprocessor_config.json`` (null values mean the default); ``overrides``
        (e.g. the model config's patch size) win."""
        kw = {k: cfg[k] for k in ("patch_size", "merge_size", "temporal_patch_size", "resample", "do_resize",
                                  "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")
              if cfg.get(k) is not None}
        for k in ("image_mean", "image_std"):
            if cfg.get(k) is not None:
                kw[k] = tuple(float(v) for v in cfg[k])
        size = cfg.get("size") or {}
        if not isinstance(size, dict):
            raise ValueError(f"preprocessor_config.json: size must be {{shortest_edge, longest_edge}} (pixel "
                             f"counts) for Qwen2-VL's processor, got {size!r}")
        for attr, new_key, old_key in (("min_pixels", "shortest_edge", "min_pixels"),
                                       ("max_pixels", "longest_edge", "max_pixels")):
            v = _pixels_setting(cfg, size, new_key, old_key)
            if v is not None:
                kw[attr] = v
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @property
    def factor(self) -> int:
        """Pixels per side of one merged token."""
        return self.patch_size * self.merge_size

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image is resized to."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return w, h

    def num_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        t, h, w = grid_thw
        return t * h * w // (self.merge_size ** 2)

    def pixels(self, image) -> torch.Tensor:
        """One image -> [3, H, W] float32, H and W multiples of ``factor``."""
        image = to_rgb(image) if self.do_convert_rgb else image
        if self.do_resize:
            size = self.resized_size(*image.size)
            if size != image.size:
                image = image.resize(size, resample=self.resample)
        elif image.width % self.factor or image.height % self.factor:
            raise ValueError(f"image of {image.width} x {image.height} pixels: with do_resize off, sides must be "
                             f"multiples of {self.factor} (patch size x merge size)")
        return model_pixels(image, self.rescale_factor if self.do_rescale else None,
                            self._norm if self.do_normalize else None)

    def patchify(self, frames: torch.Tensor) -> QwenVisionInput:
        """[T, C, H, W] frames (a still image is one frame, repeated to fill the temporal
        patch) -> flattened patches and their grid."""
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if frames.shape[0] % tp:
            frames = torch.cat([frames, frames[-1:].expand(tp - frames.shape[0] % tp, -1, -1, -1)])
        t, c, hgt, wid = frames.shape
        gt, gh, gw = t // tp, hgt // p, wid // p
        x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        # -> (gt, gh/m, gw/m, m, m, c, tp, p, p): merge blocks in raster order, their patches
        # consecutive, each patch's values channel-major then time, y, x
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return QwenVisionInput(x.reshape(gt * gh * gw, c * tp * p * p).contiguous(), (gt, gh, gw))

    def __call__(self, image) -> QwenVisionInput:
        return self.patchify(self.pixels(image)[None])
