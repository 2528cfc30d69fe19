"""Phi-4-multimodal's image processor against transformers' ``Phi4MultimodalImageProcessor``.

That processor exists only on transformers' torchvision backend, and torchvision does not
import in this environment (its wheels do not match the CPU build of torch here). The
reference is therefore transformers' own processor code run in a subprocess whose
``torchvision`` is ``torchvision_shim`` (the handful of tensor functions it calls, written as
torchvision's tensor kernels compute them: the same ``torch.nn.functional.interpolate`` calls
with the same uint8/float32 handling, padding and normalisation). Everything else (the crop
layout, the aspect-ratio search, masks, token counts, rescale/normalise fusion, the global view)
is transformers' code. Pixels, masks, sizes and token counts must be equal, not close."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_testing import random_image

pytest.importorskip("transformers")

_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torchvision_shim
torchvision_shim.install()
from PIL import Image
from safetensors.torch import save_file
from transformers.models.phi4_multimodal.image_processing_phi4_multimodal import Phi4MultimodalImageProcessor
for job in json.loads(open(sys.argv[2]).read()):
    proc = Phi4MultimodalImageProcessor(**job["kwargs"])
    tensors, meta = {}, []
    for i, path in enumerate(job["images"]):
        out = proc([Image.open(path)], return_tensors="pt")
        tensors[f"pixels{i}"] = out["image_pixel_values"][0].contiguous()
        tensors[f"masks{i}"] = out["image_attention_mask"][0].contiguous()
        meta.append({"size": out["image_sizes"][0].tolist(), "tokens": int(out["num_img_tokens"][0])})
    save_file(tensors, job["out"])
    open(job["out"] + ".json", "w").write(json.dumps(meta))
"""


def reference(tmp_path: Path, jobs: list[tuple[list[Image.Image], dict]]):
    """transformers' processor (torchvision shimmed) on each image alone, for each (images,
    processor kwargs) job, all in one fresh interpreter."""
    from safetensors.torch import load_file
    spec = []
    for j, (images, kwargs) in enumerate(jobs):
        paths = []
        for i, im in enumerate(images):
            paths.append(str(tmp_path / f"job{j}_im{i}.png"))
            im.save(paths[-1])
        spec.append({"images": paths, "kwargs": kwargs, "out": str(tmp_path / f"ref{j}.safetensors")})
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    script = tmp_path / "ref.py"
    script.write_text(_SCRIPT)
    res = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(tmp_path / "spec.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    results = []
    for job in spec:
        tensors = load_file(job["out"])
        meta = json.loads(Path(job["out"] + ".json").read_text())
        results.append([(tensors[f"pixels{i}"], tensors[f"masks{i}"], m) for i, m in enumerate(meta)])
    return results


# (W, H): tall, wide, smaller than one patch, exactly one crop, a 1-pixel pad, a very wide one
# (then a grey and an RGBA one); the dynamic_hd cap's aspect-ratio search runs in the small-crop job.
SHAPES = {"tall": (150, 1000), "wide": (1100, 260), "tiny": (9, 12), "one_crop": (448, 448),
          "almost": (449, 300), "banner": (2000, 100)}


def _check(ours, ref_out):
    px, masks, meta = ref_out
    n = ours.pixels.shape[0]
    assert px.shape[0] == n                   # each image alone: no padding crops
    assert torch.equal(ours.pixels, px)
    assert torch.equal(ours.masks, masks)
    assert list(ours.size) == meta["size"]


SMALL_CROPS = {"size": {"height": 224, "width": 224}, "dynamic_hd": 4}


def _default_images():
    images = [random_image(i, size) for i, size in enumerate(SHAPES.values())]
    grey = Image.fromarray(np.random.default_rng(9).integers(0, 256, (300, 500), dtype=np.uint8), mode="L")
    rgba = random_image(10, (200, 300)).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 200), dtype=np.uint8)))
    return images + [grey, rgba]


def _small_crop_images():
    return [random_image(20 + i, size) for i, size in enumerate([(700, 300), (50, 600), (300, 300)])]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return reference(tmp_path_factory.mktemp("phi4mm_processor"),
                     [(_default_images(), {}), (_small_crop_images(), SMALL_CROPS)])


def test_pixels_masks_sizes_and_token_counts_equal_reference(references):
    from mistralrs_arch_vision.processors.phi4mm import Phi4MMImageProcessor
    images = _default_images()
    ours = Phi4MMImageProcessor()
    for im, ref_out in zip(images, references[0]):
        got = ours(im)
        _check(got, ref_out)
        assert got.num_tokens == ref_out[2]["tokens"] == ours.num_tokens(im.height, im.width)
    crops = [ours(im).pixels.shape[0] for im in images]
    assert crops[2] == crops[3] == 2                          # smaller than a patch; exactly one crop


def test_other_crop_size_and_cap_equal_reference(references):
    """A 224-pixel crop and a cap of 4 tiles (the token count is checked by the model tests:
    transformers' processor hard-codes the 448-pixel count)."""
    from mistralrs_arch_vision.processors.phi4mm import Phi4MMImageProcessor
    ours = Phi4MMImageProcessor.from_hf(SMALL_CROPS)
    for im, ref_out in zip(_small_crop_images(), references[1]):
        _check(ours(im), ref_out)
    assert ours.layout(300, 700)[0] == (2, 1)       # 4 x 2 tiles exceed the cap of 4: searched


def test_bad_settings_and_images_are_refused():
    from mistralrs_arch_vision.processors.phi4mm import Phi4MMImageProcessor
    with pytest.raises(ValueError, match="square size"):
        Phi4MMImageProcessor.from_hf({"size": {"height": 448, "width": 224}})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        Phi4MMImageProcessor.from_hf({"size": {"height": 450, "width": 450}})
    with pytest.raises(ValueError, match="dynamic_hd"):
        Phi4MMImageProcessor.from_hf({"dynamic_hd": 0})
    with pytest.raises(ValueError, match="image_mean"):
        Phi4MMImageProcessor.from_hf({"image_mean": [0.5, 0.5]})
    with pytest.raises(ValueError, match="too extreme"):
        Phi4MMImageProcessor()(random_image(0, (5000, 3)))
