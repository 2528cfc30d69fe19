"""``Runner.generate_image`` on a tiny Flux: response shapes, the PNG on disk, seeding equal
to diffusers', FluxOffloaded (and its move order), bad input, wrong model kinds."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_flux
from mistralrs import (ChatCompletionRequest, DiffusionArchitecture, ImageGenerationResponse,
                       ImageGenerationResponseFormat, ModelDType, Runner, Which)

from mistralrs_arch_diffusion.loader import load_flux


def flux(folder, arch=DiffusionArchitecture.Flux):
    return Which.DiffusionPlain(model_id=str(folder), arch=arch, dtype=ModelDType.F32)


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def reference_png(ref, seed, height, width) -> np.ndarray:
    """diffusers' 8-bit image with the schnell defaults (4 steps, the folder's T5 limit, no guidance)."""
    with torch.no_grad():
        img = ref(tiny_flux.PROMPT, height=height, width=width, num_inference_steps=4,
                  max_sequence_length=tiny_flux.T5_MAX,
                  guidance_scale=0.0, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return (img * 255).round().astype(np.int16)


@pytest.mark.parametrize("arch", [DiffusionArchitecture.Flux, DiffusionArchitecture.FluxOffloaded])
def test_first_image_of_a_seeded_runner_equals_diffusers(tiny_flux_models, tmp_path, arch):
    ref, folder, _ = tiny_flux_models["schnell"]
    runner = Runner(which=flux(folder, arch), seed=11)
    try:
        assert runner.model_kind() == "diffusion"
        out = tmp_path / "sub" / "fox.png"
        res = runner.generate_image(tiny_flux.PROMPT, ImageGenerationResponseFormat.Url, height=48, width=64,
                                    save_file=str(out))
        assert isinstance(res, ImageGenerationResponse) and len(res.data) == 1 and res.created > 0
        assert res.data[0].url == str(out.resolve()) and res.data[0].b64_json is None
        got = png_pixels(out.read_bytes())
        assert got.shape == (48, 64, 3)
        # Rounding the same floats (<= 1/255 apart) to 8 bits differs by at most one level.
        assert np.abs(got - reference_png(ref, 11, 48, 64)).max() <= 1
        # The random stream continues: the next image differs.
        res2 = runner.generate_image(tiny_flux.PROMPT, ImageGenerationResponseFormat.B64Json, height=48, width=64)
        assert res2.data[0].url is None
        again = png_pixels(base64.b64decode(res2.data[0].b64_json))
        assert again.shape == (48, 64, 3) and np.abs(again - got).max() > 0
    finally:
        runner.shutdown()


def test_url_without_save_file_writes_a_fresh_png(tiny_flux_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = Runner(which=flux(tiny_flux_models["schnell"][1]), seed=0)
    try:
        res = runner.generate_image("a cat", ImageGenerationResponseFormat.Url, height=32, width=32)
        path = res.data[0].url
        assert path.startswith(str(tmp_path)) and path.endswith(".png")
        assert png_pixels(open(path, "rb").read()).shape == (32, 32, 3)
        b64 = runner.generate_image("a cat", "b64_json", height=32, width=48, save_file=str(tmp_path / "b.png"))
        assert png_pixels(base64.b64decode(b64.data[0].b64_json)).shape == (32, 48, 3)
        assert (tmp_path / "b.png").read_bytes() == base64.b64decode(b64.data[0].b64_json)
    finally:
        runner.shutdown()


def test_offloaded_components_move_in_only_while_they_run(tiny_flux_models):
    _, folder, _ = tiny_flux_models["dev"]
    moves = []

    def move(module, device):
        moves.append((type(module).__name__, str(device)))

    pipe = load_flux(folder, name="t", dtype=torch.float32, device=torch.device("cpu"), offload=True, seed=0,
                     move=move)
    pipe.generate("a cat", 32, 32, num_inference_steps=3)
    assert moves == [("CLIPTextModel", "cpu"), ("CLIPTextModel", "cpu"),
                     ("T5EncoderModel", "cpu"), ("T5EncoderModel", "cpu"),
                     ("FluxTransformer2DModel", "cpu"), ("FluxTransformer2DModel", "cpu"),
                     ("AutoencoderKLDecoder", "cpu"), ("AutoencoderKLDecoder", "cpu")]
    moves.clear()
    plain = load_flux(folder, name="t", dtype=torch.float32, device=torch.device("cpu"), offload=False, seed=0,
                      move=move)
    plain.generate("a cat", 32, 32, num_inference_steps=1)
    assert moves == []


@pytest.fixture(scope="module")
def runner(tiny_flux_models):
    r = Runner(which=flux(tiny_flux_models["schnell"][1]), seed=0)
    yield r
    r.shutdown()


@pytest.mark.parametrize("kw,match", [
    (dict(height=50, width=64), "height: must be a multiple of 16"),
    (dict(height=64, width=8), "width: must be between 16 and 4096"),
    (dict(height=64, width=8192), "width: must be between"),
    (dict(height=64.0, width=64), "height: must be an integer"),
])
def test_bad_sizes_are_refused(runner, kw, match):
    with pytest.raises(ValueError, match=match):
        runner.generate_image("a cat", ImageGenerationResponseFormat.Url, **kw)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused(runner, prompt):
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        runner.generate_image(prompt, ImageGenerationResponseFormat.B64Json, height=32, width=32)
    # The model keeps serving.
    ok = runner.generate_image("a cat", ImageGenerationResponseFormat.B64Json, height=32, width=32)
    assert ok.data[0].b64_json


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="arch"):
        Which.DiffusionPlain(model_id="x", arch="StableDiffusion3")


@pytest.mark.parametrize("component", ["text_encoder_2", "vae", "tokenizer"])
def test_missing_component_folder_is_named(tiny_flux_models, tmp_path, component):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_flux_models["schnell"][1], folder)
    shutil.rmtree(folder / component)
    with pytest.raises(FileNotFoundError, match=component):
        Runner(which=flux(folder))


def test_missing_weights_are_named(tiny_flux_models, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_flux_models["schnell"][1], folder)
    for f in (folder / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="transformer: no weights"):
        Runner(which=flux(folder))


def test_text_and_image_models_refuse_each_others_calls(tiny_flux_models, tmp_path):
    from mistralrs_core.testing.tiny import write_random_llama

    text_dir = write_random_llama(tmp_path / "llama", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
    runner = Runner(which=[Which.Plain(model_id=str(text_dir)), flux(tiny_flux_models["schnell"][1])])
    try:
        text_id, image_id = runner.list_models()
        with pytest.raises(ValueError, match="is not a diffusion model"):
            runner.generate_image("a cat", ImageGenerationResponseFormat.Url, height=32, width=32, model_id=text_id)
        with pytest.raises(ValueError, match="is a diffusion model"):
            runner.send_chat_completion_request(
                ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=2), model_id=image_id)
        res = runner.generate_image("a cat", ImageGenerationResponseFormat.B64Json, height=32, width=32,
                                    model_id=image_id)
        assert res.data[0].b64_json
    finally:
        runner.shutdown()
