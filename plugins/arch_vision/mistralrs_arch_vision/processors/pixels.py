"""The step every image processor ends with, done as transformers' PIL processors do it."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def model_pixels(image: Image.Image, rescale_factor: float | None,
                 norm: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """A uint8 RGB image -> [3, H, W] float32: rescaled in float64 and only then cast to
    float32 (the reference's order; rescaling in float32 differs in the last bit), then
    normalised in float32 with ``norm`` = (mean, std) shaped [3, 1, 1]."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    if rescale_factor is not None:
        x = (x.to(torch.float64) * rescale_factor).to(torch.float32)
    else:
        x = x.to(torch.float32)
    if norm is not None:
        mean, std = norm
        x = (x - mean) / std
    return x
