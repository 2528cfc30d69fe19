"""Gemma 3's image processor against transformers' PIL-path ``Gemma3ImageProcessorPil``."""
import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from mistralrs_arch_vision.processors.gemma3 import Gemma3ImageProcessor

# gemma-3-4b-it's preprocessor_config.json
RELEASED = {
    "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
    "image_seq_length": 256, "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_crop_size": 256, "pan_and_scan_min_ratio_to_activate": 1.2,
    "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 0.00392156862745098,
    "size": {"height": 896, "width": 896},
}

# A smaller target and minimum crop keep the test fast while every pan-and-scan branch runs.
SMALL = dict(RELEASED, size={"height": 64, "width": 64}, pan_and_scan_min_crop_size=24,
             image_mean=[0.48, 0.45, 0.41], image_std=[0.27, 0.26, 0.28])


def _image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: resampling filters differ visibly on such content.
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1),
                     (xx + yy) % 256], -1)
    arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)
        img = Image.fromarray(np.dstack([arr, alpha]), "RGBA")
    elif mode != "RGB":
        img = img.convert(mode)
    return img


SHAPES = {  # (width, height)
    "tall": (70, 230),
    "wide": (300, 60),
    "very_wide": (500, 40),  # more crops than max_num_crops would allow
    "square": (128, 128),
    "slightly_wide": (110, 100),  # below min_ratio_to_activate
    "smaller_than_target": (40, 30),
    "narrow_crops": (90, 20),  # elongated, but crops would be under the minimum size
}


def _reference(config):
    return transformers.Gemma3ImageProcessorPil.from_dict(dict(config))


def _compare(config, images, pas):
    ref = _reference(config)(images, do_pan_and_scan=pas, return_tensors="pt")
    ours = Gemma3ImageProcessor.from_hf(config)(images, do_pan_and_scan=pas)
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    assert ours.num_crops == [int(n) for n in ref["num_crops"]]
    diff = (ours.pixel_values - ref["pixel_values"]).abs().max().item()
    assert torch.allclose(ours.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6), diff
    # Same operations in the same dtypes: bit-equal (normalising in float64 instead would
    # already differ by ~2e-7).
    assert diff == 0.0
    return ours


@pytest.mark.parametrize("pas", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_pixels_and_crops_equal_reference(shape, pas):
    ours = _compare(SMALL, [_image(*SHAPES[shape], seed=len(shape))], pas)
    if not pas:
        assert ours.num_crops == [0]


def test_pan_and_scan_branches_are_exercised():
    proc = Gemma3ImageProcessor.from_hf(SMALL)
    crops = {k: len(proc.crop_boxes(*wh)) for k, wh in SHAPES.items()}
    assert crops == {"tall": 3, "wide": 4, "very_wide": 4, "square": 0, "slightly_wide": 0,
                     "smaller_than_target": 0, "narrow_crops": 0}
    # A ragged last crop is clipped to the image, not padded.
    assert proc.crop_boxes(70, 230)[-1] == (0, 154, 70, 230)


def test_batch_of_mixed_images_and_modes():
    # The released config leaves do_convert_rgb null, with which the reference cannot process
    # a non-RGB image at all (its mean/std have 3 channels); ours always converts, so the
    # comparison turns conversion on explicitly.
    images = [_image(70, 230, seed=1), _image(128, 128, "RGBA", seed=2), _image(300, 60, "L", seed=3),
              _image(40, 30, "P", seed=4)]
    ours = _compare(dict(SMALL, do_convert_rgb=True), images, True)
    assert ours.pixel_values.shape[0] == len(images) + sum(ours.num_crops)


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.NEAREST])
def test_configured_resample_filter(resample):
    _compare(dict(SMALL, resample=int(resample)), [_image(300, 60, seed=5), _image(40, 30, seed=6)], True)


def test_released_config():
    # The real 896x896 target, with the released pan-and-scan numbers (256-pixel crops).
    _compare(RELEASED, [_image(1100, 300, seed=7)], True)
    proc = Gemma3ImageProcessor.from_hf(RELEASED)
    assert (proc.size, proc.resample, proc.do_pan_and_scan) == ((896, 896), Image.Resampling.BILINEAR, False)
