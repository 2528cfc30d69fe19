"""The torch-only tiny Flux writer (examples, smoke tests) loads in both variants and
generates an image of the asked size; its hand-built T5 tokenizer appends ``</s>`` and pads."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from mistralrs import DiffusionArchitecture, ImageGenerationResponseFormat, ModelDType, Runner, Which

from mistralrs_arch_diffusion.tiny import write_tiny_flux


@pytest.mark.parametrize("guidance", [False, True])
def test_tiny_flux_generates(tmp_path, guidance):
    folder = write_tiny_flux(tmp_path / "m", guidance=guidance, t5_max_length=16)
    runner = Runner(which=Which.DiffusionPlain(model_id=str(folder), arch=DiffusionArchitecture.FluxOffloaded,
                                               dtype=ModelDType.F32), seed=1)
    try:
        pipe = runner._pipeline(None)
        ids = pipe.t5_tokenizer.encode("a red fox")
        assert len(ids) == 16 and ids[3] == 1 and ids[4:] == [0] * 12
        assert pipe.defaults.num_inference_steps == (50 if guidance else 4)
        pipe.defaults.num_inference_steps = 2
        res = runner.generate_image("a red fox", ImageGenerationResponseFormat.B64Json, height=32, width=64)
        assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).size == (64, 32)
    finally:
        runner.shutdown()
