"""Phi-4-multimodal's image processor ("dynamic HD"): torch on uint8 pixels, no torchvision.

transformers' ``Phi4MultimodalImageProcessor`` exists only on its torchvision backend; this
processor computes the same numbers with the same torch ops torchvision's tensor kernels use:
- the image is fitted into a grid of ``crop`` x ``crop`` tiles (at most ``dynamic_hd`` of them,
  the aspect ratio kept), resized with ``interpolate(mode="bilinear", antialias=True)`` on the
  uint8 pixels (torchvision keeps uint8 on the CPU when the CPU has AVX2, else it goes through
  float32 and rounds), padded right/bottom with white;
- normalised in float32 as ``(x - mean / rescale) / (std / rescale)``;
- a global view is the normalised canvas resized to one tile with ``interpolate(mode="bicubic",
  antialias=False)``, followed by the tiles in row-major order;
- each tile gets a ``crop / patch`` square mask of the patches that hold image (not padding).

The number of placeholder tokens follows from the masks after the tower's 2x2 pooling: the
global view's ``g * (g + 1)`` rows (each of ``g`` rows plus a separator), one separator, and
``h * (w + 1)`` rows for the useful ``h x w`` part of the tile grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mistralrs_arch_vision.inputs import to_rgb


@dataclass(frozen=True)
class Phi4MMImage:
    """One processed image.

    ``pixels`` [1 + tiles, 3, crop, crop] float32: the global view, then the tiles row-major;
    ``masks`` [1 + tiles, crop / patch, crop / patch] float32 (1 = image, 0 = padding);
    ``size`` (height, width) of the tiled canvas in pixels (transformers' ``image_sizes``);
    ``num_tokens``: the placeholder tokens the image takes."""
    pixels: torch.Tensor
    masks: torch.Tensor
    size: tuple[int, int]
    num_tokens: int


def _channels(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    value = tuple(float(v) for v in value)
    if len(value) != 3:
        raise ValueError(f"preprocessor_config.json: {name} must have 3 entries (RGB), got {len(value)}")
    return value


def _closest_ratio(aspect: float, ratios, width: int, height: int, crop: int) -> tuple[int, int]:
    """The (columns, rows) grid whose aspect is nearest the image's; on a tie the later (larger)
    grid wins when the image has more than half its area."""
    best, best_diff = (1, 1), float("inf")
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * crop * crop * cols * rows:
            best = (cols, rows)
    return best


@dataclass
class Phi4MMImageProcessor:
    crop: int = 448                 # size.height == size.width
    patch_size: int = 14
    dynamic_hd: int = 36
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self):
        self.image_mean = _channels(self.image_mean, "image_mean")
        self.image_std = _channels(self.image_std, "image_std")
        if self.crop % self.patch_size:
            raise ValueError(f"preprocessor_config.json: size {self.crop} is not a multiple of patch_size "
                             f"{self.patch_size}")
        if self.dynamic_hd < 1:
            raise ValueError(f"preprocessor_config.json: dynamic_hd must be >= 1, got {self.dynamic_hd}")

    @classmethod
    def from_hf(cls, config: dict) -> "Phi4MMImageProcessor":
        """From ``preprocessor_config.json`` (transformers 5's or Microsoft's, whose keys are a
        subset); absent or null keys take transformers' class defaults."""
        kw: dict = {}
        size = config.get("size")
        if isinstance(size, dict):
            h, w = size.get("height"), size.get("width")
            if h is None or h != w:
                raise ValueError(f"preprocessor_config.json: Phi-4-multimodal wants a square size, got {size}")
            kw["crop"] = int(h)
        elif isinstance(size, int):
            kw["crop"] = size
        for key in ("patch_size", "dynamic_hd", "rescale_factor", "do_rescale", "do_normalize", "image_mean",
                    "image_std"):
            if config.get(key) is not None:
                kw[key] = config[key]
        return cls(**kw)

    @property
    def mask_size(self) -> int:
        return self.crop // self.patch_size

    # ------------------------------------------------------------------ layout
    def layout(self, height: int, width: int):
        """((columns, rows) of tiles, (new_width, new_height), (pad_width, pad_height))."""
        crop, max_num = self.crop, self.dynamic_hd
        cols, rows = math.ceil(width / crop), math.ceil(height / crop)
        if cols * rows > max_num:
            ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1)
                             for j in range(1, n + 1) if i * j <= max_num}, key=lambda r: r[0] * r[1])
            cols, rows = _closest_ratio(width / height, ratios, width, height, crop)
        target_w, target_h = crop * cols, crop * rows
        ratio_w, ratio_h = target_w / width, target_h / height
        if ratio_w < ratio_h:
            new = (target_w, int(height * ratio_w))
            pad = (0, target_h - new[1])
        else:
            new = (int(width * ratio_h), target_h)
            pad = (target_w - new[0], 0)
        if min(new[1], target_h) < 10 or min(new[0], target_w) < 10:
            raise ValueError(f"image: an aspect ratio of {width}x{height} is too extreme to tile "
                             f"(it would be resized to {new[0]}x{new[1]})")
        return (cols, rows), new, pad

    def canvas_mask(self, grid: tuple[int, int], pad: tuple[int, int]) -> torch.Tensor:
        """[rows * m, cols * m] patch mask of the tiled canvas: whole padding patches are 0."""
        m, p = self.mask_size, self.patch_size
        mask = torch.ones(grid[1] * m, grid[0] * m)
        if pad[0] >= p:
            mask[:, -(pad[0] // p):] = 0
        if pad[1] >= p:
            mask[-(pad[1] // p):, :] = 0
        return mask

    def num_tokens(self, height: int, width: int) -> int:
        grid, _, pad = self.layout(height, width)
        return self._tokens(self.canvas_mask(grid, pad))

    def _tokens(self, mask: torch.Tensor) -> int:
        kept = mask[0::2, 0::2]           # the patches the 2x2 pooling keeps a row/column for
        g = (self.mask_size + 1) // 2
        useful_h, useful_w = int(kept[:, 0].sum()), int(kept[0, :].sum())
        return g * (g + 1) + 1 + useful_h * (useful_w + 1)

    # ------------------------------------------------------------------ pixels
    def _resize_uint8(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """torchvision's bilinear antialiased resize of a uint8 [3, H, W] tensor on the CPU."""
        if tuple(x.shape[-2:]) == (h, w):
            return x
        if "AVX2" in torch.backends.cpu.get_cpu_capability():
            return F.interpolate(x[None], size=[h, w], mode="bilinear", align_corners=False, antialias=True)[0]
        out = F.interpolate(x[None].float(), size=[h, w], mode="bilinear", align_corners=False, antialias=True)[0]
        return out.round_().to(torch.uint8)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        if self.do_normalize:
            # transformers folds the rescale into mean/std (float32 tensors times 1/rescale).
            scale = 1.0 / self.rescale_factor if self.do_rescale else 1.0
            mean = (torch.tensor(self.image_mean) * scale).view(3, 1, 1)
            std = (torch.tensor(self.image_std) * scale).view(3, 1, 1)
            return (x - mean) / std
        return x * self.rescale_factor if self.do_rescale else x

    def __call__(self, image) -> Phi4MMImage:
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        image = to_rgb(image)
        width, height = image.size
        grid, (new_w, new_h), (pad_w, pad_h) = self.layout(height, width)
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        x = self._resize_uint8(x, new_h, new_w)
        x = F.pad(x, [0, pad_w, 0, pad_h], value=255)
        canvas = self._normalize(x)
        c = self.crop
        glob = F.interpolate(canvas[None], size=[c, c], mode="bicubic", align_corners=False, antialias=False)
        cols, rows = grid
        tiles = canvas.reshape(3, rows, c, cols, c).permute(1, 3, 0, 2, 4).reshape(-1, 3, c, c)
        mask = self.canvas_mask(grid, (pad_w, pad_h))
        m = self.mask_size
        tile_masks = mask.reshape(rows, m, cols, m).transpose(1, 2).reshape(-1, m, m)
        masks = torch.cat([torch.ones(1, m, m), tile_masks])
        return Phi4MMImage(torch.cat([glob, tiles]).contiguous(), masks, (rows * c, cols * c), self._tokens(mask))
