"""Gemma 3n's image processor against transformers' PIL-path processor for Gemma 3n
(``SiglipImageProcessorPil``: the auto mapping's "pil" entry for model_type gemma3n)."""
import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from mistralrs_arch_vision.processors.gemma3n import Gemma3nImageProcessor

# The image keys of gemma-3n-E4B-it's preprocessor_config.json (the file also holds the
# audio feature extractor's keys, which the image processor ignores).
RELEASED = {
    "do_convert_rgb": None, "do_normalize": False, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessorFast",
    "image_seq_length": 256, "image_std": [0.5, 0.5, 0.5], "resample": 2,
    "rescale_factor": 0.00392156862745098, "size": {"height": 768, "width": 768},
    "feature_extractor_type": "Gemma3nAudioFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
}

# Normalisation on, another filter and a non-square target: the paths the released file skips.
SMALL = dict(RELEASED, do_normalize=True, resample=3, size={"height": 40, "width": 56},
             image_mean=[0.48, 0.45, 0.41], image_std=[0.27, 0.26, 0.28])


def test_auto_mapping_is_siglip():
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    assert IMAGE_PROCESSOR_MAPPING_NAMES["gemma3n"]["pil"] == "SiglipImageProcessorPil"


def _image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / max(width - 1, 1), yy * 255 / max(height - 1, 1), (xx + yy) % 256], -1)
    arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        img = Image.fromarray(np.dstack([arr, rng.integers(0, 256, (height, width), dtype=np.uint8)]), "RGBA")
    elif mode != "RGB":
        img = img.convert(mode)
    return img


SHAPES = {  # (width, height)
    "tall": (70, 230),
    "wide": (300, 60),
    "square": (128, 128),
    "tiny": (5, 3),        # far smaller than the target: upsampled
    "one_pixel": (1, 1),
    "large": (1030, 800),  # downsampled past the target
}


def _compare(config, images):
    ref = transformers.SiglipImageProcessorPil.from_dict(
        {k: v for k, v in config.items() if not k.startswith("feature_") and k != "sampling_rate"})
    want = ref(images, return_tensors="pt")["pixel_values"]
    got = Gemma3nImageProcessor.from_hf(config)(images)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # same operations in the same dtypes: bit-equal
    assert (got - want).abs().max().item() == 0.0
    return got


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("config", [RELEASED, SMALL], ids=["released", "small"])
def test_pixels_equal_reference(shape, config):
    got = _compare(config, [_image(*SHAPES[shape], seed=len(shape))])
    h, w = config["size"]["height"], config["size"]["width"]
    assert got.shape == (1, 3, h, w)
    if not config["do_normalize"]:
        assert 0.0 <= got.min() and got.max() <= 1.0


def test_released_config_reads_as_released():
    proc = Gemma3nImageProcessor.from_hf(RELEASED)
    assert (proc.size, proc.resample, proc.do_normalize, proc.do_convert_rgb) == \
        ((768, 768), Image.Resampling.BILINEAR, False, True)


def test_batch_of_mixed_images_and_modes():
    # A null do_convert_rgb leaves the reference's conversion off, which it then cannot do
    # for non-RGB images (4-channel RGBA would pass through); ours always converts, so the
    # comparison turns conversion on explicitly.
    images = [_image(70, 230, seed=1), _image(128, 128, "RGBA", seed=2), _image(300, 60, "L", seed=3),
              _image(40, 30, "P", seed=4), np.asarray(_image(33, 17, seed=5))]
    got = _compare(dict(SMALL, do_convert_rgb=True), images)
    assert got.shape[0] == len(images)


@pytest.mark.parametrize("patch,field", [
    ({"size": {"shortest_edge": 768}}, "size"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"size": {"height": 0, "width": 768}}, "size"),
])
def test_bad_configs(patch, field):
    with pytest.raises(ValueError, match=field):
        Gemma3nImageProcessor.from_hf(dict(RELEASED, **patch))


def test_unresized_images_of_different_sizes_are_refused():
    proc = Gemma3nImageProcessor.from_hf(dict(RELEASED, do_resize=False))
    assert proc([_image(20, 10), _image(20, 10, seed=1)]).shape == (2, 3, 10, 20)
    with pytest.raises(ValueError, match="different sizes"):
        proc([_image(20, 10), _image(10, 20)])
