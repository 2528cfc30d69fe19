"""Qwen2-VL's image processor against transformers' PIL-path ``Qwen2VLImageProcessorPil``:
flattened patches bit-equal, the same grids and so the same placeholder counts."""
import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from mistralrs_arch_vision.processors.qwen2_vl import Qwen2VLImageProcessor, smart_resize

# Qwen2-VL-2B-Instruct's preprocessor_config.json
RELEASED = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
}
# Small limits keep the test fast and make both the min and the max branch of smart_resize run.
SMALL = dict(RELEASED, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 60, image_mean=[0.48, 0.45, 0.41],
             image_std=[0.27, 0.26, 0.28])
# Qwen3-VL's shape: 16-pixel patches, the newer size spelling, mean/std 0.5.
QWEN3 = {"size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 50}, "patch_size": 16,
         "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


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
    "tiny": (9, 5),              # smaller than one patch: grown to min_pixels
    "big": (700, 530),           # over max_pixels: shrunk
    "exact": (112, 56),          # already multiples of the factor: no resize at all
    "odd": (131, 97),
}


def _reference(config):
    return transformers.Qwen2VLImageProcessorPil(**{k: v for k, v in config.items()
                                                     if not k.endswith("_type") and k != "processor_class"})


def _compare(config, images):
    ref = _reference(config)(images, return_tensors="pt")
    proc = Qwen2VLImageProcessor.from_config(config)
    ours = [proc(im) for im in images]
    assert [list(o.grid_thw) for o in ours] == ref["image_grid_thw"].tolist()
    patches = torch.cat([o.patches for o in ours])
    assert patches.dtype == torch.float32 and patches.shape == ref["pixel_values"].shape
    assert torch.equal(patches, ref["pixel_values"]), (patches - ref["pixel_values"]).abs().max()
    return proc, ours


@pytest.mark.parametrize("shape", list(SHAPES))
def test_patches_and_grid_equal_reference(shape):
    proc, (out,) = _compare(SMALL, [_image(*SHAPES[shape], seed=len(shape))])
    t, h, w = out.grid_thw
    assert t == 1 and h % 2 == 0 and w % 2 == 0
    assert SMALL["min_pixels"] <= h * w * 14 * 14 <= SMALL["max_pixels"]


def test_placeholder_counts_equal_reference_processor():
    ref = _reference(SMALL)
    proc = Qwen2VLImageProcessor.from_config(SMALL)
    for w, h in SHAPES.values():
        # what Qwen2VLProcessor expands <|image_pad|> to
        want = ref.get_number_of_image_patches(h, w) // 4
        assert proc.num_tokens(proc(_image(w, h)).grid_thw) == want


def test_mixed_modes_in_one_batch():
    images = [_image(70, 230, seed=1), _image(64, 64, "RGBA", seed=2), _image(300, 60, "L", seed=3),
              _image(40, 30, "P", seed=4)]
    _compare(SMALL, images)


def test_patch16_and_size_spelling():
    _, outs = _compare(QWEN3, [_image(300, 60, seed=5), _image(9, 5, seed=6), _image(500, 420, seed=7)])
    assert all(o.patches.shape[1] == 3 * 2 * 16 * 16 for o in outs)
    proc = Qwen2VLImageProcessor.from_config(QWEN3)
    assert (proc.factor, proc.min_pixels, proc.max_pixels) == (32, 32 * 32 * 4, 32 * 32 * 50)


def test_released_config():
    proc, (out,) = _compare(RELEASED, [_image(333, 250, seed=8)])
    assert out.grid_thw == (1, 18, 24)
    assert proc.num_tokens(out.grid_thw) == 108


def test_smart_resize_matches_reference_function():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(x) for x in rng.integers(1, 3000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in ((3136, 12845056), (3136, 28 * 28 * 64)):
            assert smart_resize(h, w, 28, lo, hi) == ref(h, w, 28, lo, hi)


def test_bad_inputs():
    with pytest.raises(ValueError, match="aspect ratio"):
        Qwen2VLImageProcessor.from_config(SMALL)(_image(1000, 4))
    with pytest.raises(ValueError, match="min_pixels"):
        Qwen2VLImageProcessor.from_config(dict(SMALL, min_pixels=10 ** 6))
    with pytest.raises(ValueError, match="patch_size"):
        Qwen2VLImageProcessor.from_config(dict(SMALL, patch_size=0))
    with pytest.raises(ValueError, match="size"):
        Qwen2VLImageProcessor.from_config(dict(SMALL, size=224))
