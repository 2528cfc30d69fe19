"""Our CLIP image processor against transformers' PIL-path ``CLIPImageProcessorPil``."""
import numpy as np
import pytest
import torch
from PIL import Image

from mistralrs_arch_vision.processors.clip import CLIPImageProcessor, center_crop

transformers = pytest.importorskip("transformers")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

SHAPES = [(64, 48), (23, 90), (120, 31), (9, 13)]      # (width, height): landscape, tall, wide, tiny


def image(w, h, seed=0):
    rng = np.random.default_rng(seed + w * 1000 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("cfg", [
    {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}},
    # A crop larger than the resized image: the reference pads with zeros.
    {"size": {"shortest_edge": 20}, "crop_size": {"height": 26, "width": 24}},
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 30, "width": 30}, "resample": 2,
     "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_transformers_pil_processor(cfg, shape):
    theirs = CLIPImageProcessorPil(**cfg)
    ours = CLIPImageProcessor.from_config(cfg)
    img = image(*shape)
    want = torch.as_tensor(np.asarray(theirs(images=img, return_tensors="np")["pixel_values"][0]))
    got = ours(img)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-6), float((got - want).abs().max())


def test_non_rgb_modes_are_converted():
    ours = CLIPImageProcessor.from_config({"size": {"shortest_edge": 16}, "crop_size": 16})
    rgba = image(20, 30).convert("RGBA")
    assert torch.equal(ours(rgba), ours(rgba.convert("RGB")))
    assert ours(image(20, 30).convert("L")).shape == (3, 16, 16)


def test_resize_keeps_the_reference_truncation():
    p = CLIPImageProcessor(shortest_edge=224)
    assert p.resized_size(640, 480) == (298, 224)          # int(224 * 640 / 480) = 298
    assert p.resized_size(480, 641) == (224, 299)


def test_center_crop_pads_odd_differences_top_left_first():
    px = np.ones((3, 2, 1), dtype=np.uint8)
    out = center_crop(px, 6, 5)
    rows, cols = np.nonzero(out[..., 0])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 4, 2, 3)
