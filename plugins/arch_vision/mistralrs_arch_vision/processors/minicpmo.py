"""MiniCPM-V 2.6 / MiniCPM-o 2.6's image processor (the hub's ``MiniCPMVImageProcessor``
algorithm), Pillow + torch.

An image becomes a *source* image (the whole picture, resized so its area is about
``scale_resolution``², each side a multiple of the patch) and, when it is larger than that,
a grid of *slices* cut from a second resize (the "refine" image) whose cells are about
``scale_resolution``² each. The grid (``cols x rows``, at most ``max_slice_nums`` cells)
is the one whose aspect ratio is closest, in log space, to the image's among the cell counts
around area / scale_resolution². Every piece is resized with Pillow's bicubic filter on
uint8 pixels, scaled by 1/255 and normalised in float32, and laid out as the model reads it:
[C, patch, rows * cols * patch], patch k of the raster order in columns [k * patch, (k+1) *
patch), with its patch grid (rows, cols) as the target size.

In the prompt each image's ``(<image>./</image>)`` tag becomes
``[<image_id>i</image_id>]<image>`` + ``image_feature_size`` ``<unk>`` + ``</image>``, then one
``<slice>`` + ``<unk>``s + ``</slice>`` per slice, a row of the grid per line.

The hub's arithmetic is kept where it decides sizes: Python's ``round`` (half to even) in
``ensure_divide``, ``int`` truncation in the resize rule, float grid sizes in the refine rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import attrs
import numpy as np
import torch
from PIL import Image

from mistralrs_arch_vision.inputs import to_rgb

RAW_IMAGE_TAG = "(<image>./</image>)"


def ensure_divide(length: float, patch: int) -> int:
    """``length`` rounded (half to even, as Python's ``round``) to a multiple of ``patch``, at
    least one patch."""
    return max(round(length / patch) * patch, patch)


def find_best_resize(size: tuple[float, float], scale: int, patch: int, allow_upscale: bool = False
                     ) -> tuple[int, int]:
    """(width, height): an image larger than scale² (or any, with ``allow_upscale``) is
    scaled to about scale² at its aspect ratio; both sides then snap to the patch."""
    width, height = size
    if width * height > scale * scale or allow_upscale:
        ratio = width / height
        height = int(scale / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch), ensure_divide(height, patch)


def get_refine_size(size: tuple[int, int], grid: tuple[int, int], scale: int, patch: int) -> tuple[int, int]:
    """(width, height) of the image the slices are cut from: each cell of the grid resized
    as ``find_best_resize`` would (upscaling allowed), times the grid."""
    width, height = size
    cols, rows = grid
    cell = (ensure_divide(width, cols) / cols, ensure_divide(height, rows) / rows)
    cw, ch = find_best_resize(cell, scale, patch, allow_upscale=True)
    return cw * cols, ch * rows


def get_sliced_grid(size: tuple[int, int], max_slice_nums: int, scale: int) -> tuple[int, int] | None:
    """(cols, rows) of the slice grid, or None for an image small enough to take whole."""
    width, height = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale * scale)), max_slice_nums)
    if multiple <= 1:
        return None
    best, best_err = (1, 1), float("inf")
    for cells in (multiple - 1, multiple, multiple + 1):
        if cells == 1 or cells > max_slice_nums:
            continue
        for cols in range(1, cells + 1):
            if cells % cols:
                continue
            err = abs(log_ratio - math.log(cols / (cells // cols)))
            if err < best_err:            # the first of equal errors wins
                best, best_err = (cols, cells // cols), err
    return best


def reshape_by_patch(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H, W] -> [C, patch, (H // patch) * (W // patch) * patch]: the patches in raster
    order side by side (a trailing partial patch is dropped, as ``unfold`` drops it)."""
    c, h, w = pixels.shape
    rows, cols = h // patch, w // patch
    x = pixels[:, :rows * patch, :cols * patch].reshape(c, rows, patch, cols, patch)
    return x.permute(0, 2, 1, 3, 4).reshape(c, patch, rows * cols * patch)


@attrs.frozen(eq=False)
class MiniCpmSlice:
    """One encoder input: a source image or a slice, in the model's patch layout.

    ``pixels`` [C, patch, rows * cols * patch]; ``tgt_size`` (rows, cols) of its patch grid."""
    pixels: torch.Tensor
    tgt_size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.tgt_size[0] * self.tgt_size[1]


def _channels(value, name: str) -> tuple[float, float, float]:
    value = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
    if len(value) == 1:
        value = value * 3
    if len(value) != 3:
        raise ValueError(f"preprocessor_config.json: {name} must have 3 entries (RGB), got {len(value)}")
    return value


@dataclass
class MiniCpmImageProcessor:
    """The hub's settings and defaults (``preprocessor_config.json`` keys)."""
    max_slice_nums: int = 9
    scale_resolution: int = 448
    patch_size: int = 14
    slice_mode: bool = True
    use_image_id: bool = False
    image_feature_size: int = 64
    im_start: str = "<image>"
    im_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    unk: str = "<unk>"
    im_id_start: str = "<image_id>"
    im_id_end: str = "</image_id>"
    norm_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    norm_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    _norm: tuple = field(default=None, init=False, repr=False)

    def __post_init__(self):
        for name in ("max_slice_nums", "scale_resolution", "patch_size", "image_feature_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"preprocessor_config.json: {name} must be a positive integer, got {value!r}")
        self.norm_mean = _channels(self.norm_mean, "norm_mean")
        self.norm_std = _channels(self.norm_std, "norm_std")
        self._norm = (np.asarray(self.norm_mean, dtype=np.float32), np.asarray(self.norm_std, dtype=np.float32))

    @classmethod
    def from_hf(cls, config: dict) -> "MiniCpmImageProcessor":
        """From ``preprocessor_config.json``; absent or null keys mean the default."""
        kwargs = {name: config[name] for name in cls.__dataclass_fields__
                  if not name.startswith("_") and config.get(name) is not None}
        return cls(**kwargs)

    # ------------------------------------------------------------------ geometry
    def grid(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """(cols, rows) of an image of ``size`` (width, height); None: no slices."""
        if not self.slice_mode:
            return None
        return get_sliced_grid(size, self.max_slice_nums, self.scale_resolution)

    def pieces(self, image: Image.Image) -> list[Image.Image]:
        """The source image, then the slices row by row (top to bottom, left to right)."""
        if not self.slice_mode:
            return [image]
        size, s, p = image.size, self.scale_resolution, self.patch_size
        grid = self.grid(size)
        if grid is None:
            return [image.resize(find_best_resize(size, s, p, allow_upscale=True), Image.Resampling.BICUBIC)]
        source = image.resize(find_best_resize(size, s, p), Image.Resampling.BICUBIC)
        refine = image.resize(get_refine_size(size, grid, s, p), Image.Resampling.BICUBIC)
        cols, rows = grid
        cw, ch = refine.width // cols, refine.height // rows
        slices = [refine.crop((x * cw, y * ch, (x + 1) * cw, (y + 1) * ch)) for y in range(rows) for x in range(cols)]
        return [source, *slices]

    # ------------------------------------------------------------------ pixels
    def to_slice(self, piece: Image.Image) -> MiniCpmSlice:
        p = self.patch_size
        if piece.width < p or piece.height < p:
            raise ValueError(f"image: a piece of {piece.width}x{piece.height} pixels holds no {p}x{p} patch "
                             f"(slice_mode off keeps images at their own size)")
        # float32 throughout, as the reference: x / 255, then (x - mean) / std.
        x = np.asarray(piece, dtype=np.uint8).astype(np.float32) / np.float32(255)
        mean, std = self._norm
        x = (x - mean) / std
        pixels = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        return MiniCpmSlice(reshape_by_patch(pixels, p), (piece.height // p, piece.width // p))

    def __call__(self, image) -> list[MiniCpmSlice]:
        """One image -> its source image and slices, in prompt order."""
        return [self.to_slice(piece) for piece in self.pieces(to_rgb(image))]

    # ------------------------------------------------------------------ prompt text
    def placeholder(self, size: tuple[int, int], index: int) -> str:
        """What the ``index``-th image's tag becomes for an image of ``size`` (width, height)."""
        run = self.unk * self.image_feature_size
        text = f"{self.im_start}{run}{self.im_end}"
        if self.use_image_id:
            text = f"{self.im_id_start}{index}{self.im_id_end}{text}"
        grid = self.grid(size)
        if grid is not None:
            cols, rows = grid
            row = f"{self.slice_start}{run}{self.slice_end}" * cols
            text += "\n".join([row] * rows)
        return text
