"""Llama 4's image preprocessing (transformers' ``Llama4ImageProcessor``, a torch-tensor
processor): pick the canvas of tile rows x cols (at most ``max_patches`` tiles) that needs the
smallest upscale (else the smallest downscale; ties: the smaller canvas, then the first in
the reference's list order), resize the uint8 image onto it keeping the aspect ratio (never
upscaling past one tile per side unless ``resize_to_max_canvas``), pad bottom/right with
zeros, rescale and normalise in bfloat16 (as the original implementation does), cut into
tiles in raster order and, when there is more than one tile, append the whole image resized
to one tile (the global thumbnail).

Resizing is bilinear with antialiasing on the uint8 tensor (torch's native uint8 kernel,
the one torchvision's ``resize`` calls for uint8 CPU tensors).
"""
from __future__ import annotations

from collections import defaultdict

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def supported_canvases(max_tiles: int) -> list[tuple[int, int]]:
    """(tile rows, tile cols) with rows * cols <= max_tiles, in the reference's order: grouped
    by aspect ratio in the order each ratio first appears, walking tile counts downward."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        for a in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio[a / (n // a)].append((a, n // a))
    return [layout for group in by_ratio.values() for layout in group]


def best_canvas(height: int, width: int, max_tiles: int, tile: int, to_max: bool = False):
    """(canvas height, canvas width) in pixels as 0-d int64 tensors; float32 scale arithmetic
    as the reference's."""
    res = torch.tensor([(r * tile, c * tile) for r, c in supported_canvases(max_tiles)])
    scales = torch.minimum(res[:, 1] / width, res[:, 0] / height)
    up = scales[scales >= 1]
    chosen = (up.max() if to_max else up.min()) if len(up) else scales[scales < 1].max()
    cands = res[scales == chosen]
    best = cands[torch.argmin(cands[:, 0] * cands[:, 1])]
    return best[0], best[1]


def fitted_size(height: int, width: int, target_h, target_w) -> tuple[int, int]:
    """The aspect-preserving size inside (target_h, target_w). A target that is a 0-d tensor
    (the canvas side itself) makes its scale float32, as in the reference, whose arithmetic
    this follows step by step so rounding at the edges agrees."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(int(height * scale_w), target_h)
    else:
        new_h, new_w = target_h, min(int(width * scale_h), target_w)
    return max(int(new_h), 1), max(int(new_w), 1)


@attrs.frozen
class Llama4ImageProcessor:
    tile_size: int = 336
    max_patches: int = 16
    resize_to_max_canvas: bool = False
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_config(cls, cfg: dict) -> "Llama4ImageProcessor":
        size = cfg.get("size") or {"height": 336, "width": 336}
        if size.get("height") != size.get("width"):
            raise ValueError(f"preprocessor_config.json: Llama 4 tiles are square, got size {size}")
        if not cfg.get("do_resize", True):
            raise ValueError("preprocessor_config.json: Llama 4 always resizes (do_resize=false is unsupported)")
        if not cfg.get("do_rescale", True) or not cfg.get("do_normalize", True):
            raise ValueError("preprocessor_config.json: Llama 4 expects do_rescale and do_normalize")
        if int(cfg.get("resample", 2)) != 2:
            raise ValueError(f"preprocessor_config.json: resample {cfg['resample']} (Llama 4 resizes bilinearly)")
        return cls(tile_size=int(size["height"]), max_patches=int(cfg.get("max_patches", 16)),
                   resize_to_max_canvas=bool(cfg.get("resize_to_max_canvas", False)),
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   image_mean=tuple(cfg.get("image_mean") or (0.5,) * 3),
                   image_std=tuple(cfg.get("image_std") or (0.5,) * 3))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16) * self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=torch.bfloat16).view(-1, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.bfloat16).view(-1, 1, 1)
        return x.sub(mean).div(std)

    def layout(self, height: int, width: int) -> tuple[int, int]:
        """(tile rows, tile cols) for an image of this size."""
        ch, cw = best_canvas(height, width, self.max_patches, self.tile_size, self.resize_to_max_canvas)
        return int(ch) // self.tile_size, int(cw) // self.tile_size

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """-> (tiles [N, 3, S, S] float32 (bfloat16 values), (tile rows, tile cols)); N = rows *
        cols, plus the thumbnail when that is more than one."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        px = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]     # [1, 3, H, W] uint8
        h, w, t = px.shape[2], px.shape[3], self.tile_size
        ch, cw = best_canvas(h, w, self.max_patches, t, self.resize_to_max_canvas)
        if self.resize_to_max_canvas:
            th, tw = ch, cw
        else:
            th, tw = min(max(h, t), ch), min(max(w, t), cw)
        nh, nw = fitted_size(h, w, th, tw)
        ch, cw = int(ch), int(cw)
        resized = F.interpolate(px, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        canvas = F.pad(resized, (0, cw - nw, 0, ch - nh))
        x = self._normalize(canvas[0])
        rows, cols = ch // t, cw // t
        tiles = x.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        if rows * cols > 1:
            thumb = F.interpolate(px, size=(t, t), mode="bilinear", align_corners=False, antialias=True)
            tiles = torch.cat([tiles, self._normalize(thumb[0])[None]])
        return tiles.float(), (rows, cols)


def image_token_layout(rows: int, cols: int, per_tile: int, *, start: int, end: int, image: int, patch: int,
                       tile_x: int, tile_y: int) -> list[int]:
    """The expansion of one image (transformers' ``Llama4Processor._prompt_split_image``)."""
    ids = [start]
    if rows * cols > 1:
        for _ in range(rows):
            for x in range(cols):
                ids += [patch] * per_tile
                if x < cols - 1:
                    ids.append(tile_x)
            ids.append(tile_y)
    return ids + [image] + [patch] * per_tile + [end]
