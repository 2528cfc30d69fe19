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

Video (``Qwen2VLVideoProcessor``, transformers' class of that name): frames are sampled at
``fps`` (2 a second by default, as the model was trained: qwen-vl-utils), their count clamped to
``[min_frames, max_frames]`` and floored to a multiple of ``temporal_patch_size``; every frame
is resized to one ``smart_resize`` size (the video's own pixel bounds) by torch's antialiased
bicubic on uint8, as transformers' torchvision path resizes, then normalised and patchified
like a still image, ``temporal_patch_size`` frames per temporal patch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import attrs
import numpy as np
import torch
import torch.nn.functional as F
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
    ``grid_thw`` (t, h, w) in patches; a video's also ``second_per_grid_t``, the seconds one
    temporal patch spans (Qwen2.5-VL spaces temporal positions by it), None for an image."""
    patches: torch.Tensor
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float | None = None

    @property
    def is_video(self) -> bool:
        return self.second_per_grid_t is not None


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


#: transformers' ``Qwen2VLVideoProcessor`` pixel bounds per frame (min, max)
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 28 * 28 * 768
_INTERPOLATION = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


@dataclass
class Qwen2VLVideoProcessor:
    """Frames -> ``QwenVisionInput``; the image settings (patch, merge, mean, std) are the
    image processor's, the pixel bounds and the sampling rule the video's own."""
    image: Qwen2VLImageProcessor
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    fps: float | None = 2.0
    min_frames: int = 4
    max_frames: int = 768
    do_sample_frames: bool = True
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000

    def __post_init__(self):
        if self.image.resample not in _INTERPOLATION:
            raise ValueError(f"video_preprocessor_config.json: resample {int(self.image.resample)} is not "
                             f"bicubic (3) or bilinear (2)")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"video_preprocessor_config.json: min_pixels ({self.min_pixels}) exceeds max_pixels "
                             f"({self.max_pixels})")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"video_preprocessor_config.json: fps must be positive, got {self.fps}")

    @classmethod
    def from_config(cls, cfg: dict, image: Qwen2VLImageProcessor) -> "Qwen2VLVideoProcessor":
        """From ``video_preprocessor_config.json`` or, lacking one, ``preprocessor_config.json``
        (as transformers falls back): ``min_pixels``/``max_pixels``/``size`` bound a frame."""
        kw = {k: cfg[k] for k in ("fps", "min_frames", "max_frames", "do_sample_frames", "cap_pixels_per_frame",
                                  "max_video_tokens") if cfg.get(k) is not None}
        size = cfg.get("size") or {}
        for attr, new_key, old_key in (("min_pixels", "shortest_edge", "min_pixels"),
                                       ("max_pixels", "longest_edge", "max_pixels")):
            v = _pixels_setting(cfg, size if isinstance(size, dict) else {}, new_key, old_key)
            if v is not None:
                kw[attr] = v
        return cls(image, **kw)

    def sample_frames(self, total: int, fps: float) -> list[int]:
        """Indices of the frames kept of a ``total``-frame clip at ``fps``: transformers'
        ``Qwen2VLVideoProcessor.sample_frames`` with its fps rule (its float32 ``arange``
        included, so the same frames are picked). A clip shorter than one temporal patch
        keeps every frame (the reference fails on it): patchify repeats the last."""
        if not self.do_sample_frames or self.fps is None:
            return list(range(total))
        tp = self.image.temporal_patch_size
        most = math.floor(min(self.max_frames, total) / tp) * tp
        n = min(max(total / fps * self.fps, self.min_frames), most, total)
        n = math.floor(n / tp) * tp
        if n <= 0:
            return list(range(total))
        return torch.arange(0, total, total / n).int().tolist()

    def frame_size(self, height: int, width: int, frames: int) -> tuple[int, int]:
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            # qwen-vl-utils' bound on a whole clip: each frame an even share of the token budget
            factor = self.image.factor
            total = int(self.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total * self.image.temporal_patch_size // frames),
                             int(self.min_pixels * 1.05))
        return smart_resize(height, width, self.image.factor, self.min_pixels, max_pixels)

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [T, H, W, 3] -> float32 [T, 3, H', W']."""
        img = self.image
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        if img.do_resize:
            size = self.frame_size(x.shape[2], x.shape[3], x.shape[0])
            if size != tuple(x.shape[2:]):
                # uint8 in and out, as torchvision resizes uint8 on the CPU (rounded, clamped)
                x = F.interpolate(x.contiguous(), size=list(size), mode=_INTERPOLATION[img.resample],
                                  align_corners=False, antialias=True)
        elif x.shape[2] % img.factor or x.shape[3] % img.factor:
            raise ValueError(f"frames of {x.shape[3]} x {x.shape[2]} pixels: with do_resize off, sides must be "
                             f"multiples of {img.factor}")
        x = x.to(torch.float32)
        if img.do_normalize:
            # transformers folds the rescale into mean and std (x - 255 mean) / (255 std), in float32
            scale = 1.0 / img.rescale_factor if img.do_rescale else 1.0
            mean = torch.tensor(img.image_mean, dtype=torch.float32) * scale
            std = torch.tensor(img.image_std, dtype=torch.float32) * scale
            x = (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        elif img.do_rescale:
            x = x * img.rescale_factor
        return x

    def __call__(self, frames: np.ndarray, fps: float) -> QwenVisionInput:
        """Sampled frames at ``fps`` frames a second -> patches, grid and seconds per temporal patch."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
            raise ValueError(f"video frames must be [T >= 1, H, W, 3] RGB, got {list(frames.shape)}")
        out = self.image.patchify(self.pixels(frames))
        return attrs.evolve(out, second_per_grid_t=self.image.temporal_patch_size / fps)
