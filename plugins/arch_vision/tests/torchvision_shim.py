"""A stand-in for the few ``torchvision`` functions transformers' torchvision-backed image
processors call, so that those processors (Phi-4-multimodal's has no PIL path) can serve as
a test reference where torchvision does not import (this venv's torch is a CPU build that
torchvision wheels do not match).

Each function does what torchvision 0.2x's tensor kernel does, in the same torch ops:
``resize`` is ``torch.nn.functional.interpolate`` (align_corners=False for bilinear/bicubic,
antialias as asked), on uint8 directly where torchvision keeps uint8 on the CPU (bilinear with
AVX2, bicubic), otherwise through float32 with clamp (bicubic) and round back to uint8.
``install()`` must run in a fresh interpreter before transformers is imported (the reference
runs in a subprocess for that reason): it registers the modules and makes transformers'
availability check see them."""
from __future__ import annotations

import enum
import importlib.machinery
import sys
import types

import torch
import torch.nn.functional as F


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _native_uint8(mode: InterpolationMode) -> bool:
    if mode == InterpolationMode.BILINEAR:
        return "AVX2" in torch.backends.cpu.get_cpu_capability()
    return mode == InterpolationMode.BICUBIC


def resize(image, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    if isinstance(interpolation, int):
        raise TypeError("shim: pass an InterpolationMode")
    if max_size is not None or len(size) != 2:
        raise NotImplementedError("shim: resize takes an explicit [height, width]")
    smooth = interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    if interpolation not in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC,
                             InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT):
        raise NotImplementedError(f"shim: {interpolation}")
    antialias = bool(antialias) and smooth
    shape = image.shape
    c, h, w = shape[-3:]
    new_h, new_w = int(size[0]), int(size[1])
    if (new_h, new_w) == (h, w):
        return image
    dtype = image.dtype
    ok = [torch.float32, torch.float64]
    if not smooth or (image.device.type == "cpu" and _native_uint8(interpolation)):
        ok.append(torch.uint8)
    x = image.reshape(-1, c, h, w)
    cast = dtype not in ok
    if cast:
        x = x.to(torch.float32)
    x = F.interpolate(x, size=[new_h, new_w], mode=interpolation.value,
                      align_corners=False if smooth else None, antialias=antialias)
    if cast:
        if interpolation == InterpolationMode.BICUBIC and dtype == torch.uint8:
            x = x.clamp_(0, 255)
        if not dtype.is_floating_point:
            x = x.round_()
        x = x.to(dtype)
    return x.reshape(shape[:-3] + (c, new_h, new_w))


def pad(image, padding, fill=0, padding_mode="constant"):
    if padding_mode != "constant":
        raise NotImplementedError("shim: constant padding only")
    if isinstance(padding, int):
        padding = [padding] * 4
    elif len(padding) == 2:
        padding = [padding[0], padding[1], padding[0], padding[1]]
    left, top, right, bottom = (int(p) for p in padding)
    out = F.pad(image, [left, right, top, bottom], value=0)
    fills = fill if isinstance(fill, (list, tuple)) else [fill] * image.shape[-3]
    h, w = image.shape[-2:]
    region = torch.ones(out.shape[-2:], dtype=torch.bool)
    region[top:top + h, left:left + w] = False
    for ch, value in enumerate(fills):
        out[..., ch, :, :][..., region] = torch.tensor(value, dtype=out.dtype)
    return out


def normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


def grayscale_to_rgb(image):
    return image if image.shape[-3] >= 3 else image.expand(*image.shape[:-3], 3, *image.shape[-2:]).clone()


def to_dtype(image, dtype=torch.float32, scale=False):
    if not scale:
        return image.to(dtype)
    if image.dtype == dtype:
        return image
    if not image.dtype.is_floating_point and dtype.is_floating_point:
        return image.to(dtype) / 255.0
    if image.dtype.is_floating_point and not dtype.is_floating_point:
        return image.mul(255.0).round_().clamp_(0, 255).to(dtype)
    return image.to(dtype)


def crop(image, top, left, height, width):
    return image[..., top:top + height, left:left + width]


def pil_to_tensor(pic):
    import numpy as np
    arr = np.array(pic, copy=True)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def install() -> None:
    if "transformers" in sys.modules:
        raise RuntimeError("install the torchvision shim before importing transformers")
    fns = dict(resize=resize, pad=pad, normalize=normalize, grayscale_to_rgb=grayscale_to_rgb,
               to_dtype=to_dtype, crop=crop, pil_to_tensor=pil_to_tensor, InterpolationMode=InterpolationMode)
    root = _module("torchvision", __version__="0.25.0")
    root.transforms = _module("torchvision.transforms", InterpolationMode=InterpolationMode)
    root.transforms.functional = _module("torchvision.transforms.functional", **fns)
    root.transforms.v2 = _module("torchvision.transforms.v2")
    root.transforms.v2.functional = _module("torchvision.transforms.v2.functional", **fns)
    root.io = _module("torchvision.io")      # imported by transformers' video utilities, unused here
    import importlib.metadata as md
    real_version = md.version

    def version(name):
        return "0.25.0" if name == "torchvision" else real_version(name)
    md.version = version
