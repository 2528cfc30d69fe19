"""Whole generations against diffusers' ``FluxPipeline`` with the same seed: schnell and dev,
the diffusers folder and the single-file layout, square and non-square sizes. The float
image (before 8-bit rounding) must be within 1/255 of the reference everywhere."""
from __future__ import annotations

import pytest
import torch

import tiny_flux

from mistralrs_arch_diffusion.loader import load_flux


@pytest.fixture(scope="module")
def loaded(tiny_flux_models):
    out = {}
    for variant, (_, folder, single) in tiny_flux_models.items():
        for layout, path in (("diffusers", folder), ("single", single)):
            out[variant, layout] = load_flux(path, name="t", dtype=torch.float32, device=torch.device("cpu"),
                                             offload=False, seed=0)
    return out


# Every variant and size through the diffusers folder; the single files (whose loaded weights
# are checked equal below) for one size each.
CASES = [(variant, steps, guidance, layout, h, w)
         for variant, steps, guidance in (("schnell", 4, None), ("dev", 3, 2.5))
         for h, w in ((64, 64), (48, 80))
         for layout in ("diffusers", "single")
         if layout == "diffusers" or (variant == "schnell") == (h == 48)]


@pytest.mark.parametrize("variant,steps,guidance,layout,height,width", CASES)
def test_image_equals_diffusers(tiny_flux_models, loaded, variant, steps, guidance, layout, height, width):
    ref = tiny_flux_models[variant][0]
    ours = loaded[variant, layout]
    seed = 7
    kw = dict(guidance_scale=guidance) if guidance is not None else dict(guidance_scale=0.0)
    with torch.no_grad():
        want = ref(tiny_flux.PROMPT, height=height, width=width, num_inference_steps=steps, max_sequence_length=48,
                   generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images[0]
    got = ours.generate(tiny_flux.PROMPT, height, width, num_inference_steps=steps, guidance_scale=guidance,
                        max_sequence_length=48, generator=torch.Generator().manual_seed(seed))
    got = got[0].permute(1, 2, 0).numpy()
    assert got.shape == want.shape == (height, width, 3)
    # The check means something only if the image is not saturated flat.
    assert 0.2 < ((got > 0) & (got < 1)).mean()
    assert abs(got - want).max() <= 1 / 255


def test_single_file_weights_equal_the_diffusers_folder(loaded):
    for variant in ("schnell", "dev"):
        a, b = loaded[variant, "diffusers"], loaded[variant, "single"]
        for name in ("transformer", "vae"):
            sa = dict(getattr(a, name).state_dict())
            sb = dict(getattr(b, name).state_dict())
            assert sa.keys() == sb.keys()
            for k in sa:
                assert torch.equal(sa[k], sb[k]), (name, k)


def test_defaults_follow_the_variant(loaded):
    s, d = loaded["schnell", "diffusers"].defaults, loaded["dev", "diffusers"].defaults
    # The T5 context is capped by the folder's tokenizer limit (40 in the tiny models).
    assert (s.num_inference_steps, s.guidance_scale, s.max_sequence_length) == (4, None, tiny_flux.T5_MAX)
    assert (d.num_inference_steps, d.guidance_scale, d.max_sequence_length) == (50, 3.5, tiny_flux.T5_MAX)
    from mistralrs_arch_diffusion.pipeline import FluxDefaults
    assert FluxDefaults.for_transformer(False) == FluxDefaults(4, None, 256)
    assert FluxDefaults.for_transformer(True) == FluxDefaults(50, 3.5, 512)


def test_max_sequence_length_is_honoured(tiny_flux_models, loaded):
    """A shorter T5 context changes the image exactly as it changes the reference's."""
    ref = tiny_flux_models["schnell"][0]
    ours = loaded["schnell", "diffusers"]
    prompt = " ".join(tiny_flux.WORDS * 3)
    outs = []
    for n in (8, 64):
        with torch.no_grad():
            want = ref(prompt, height=48, width=48, num_inference_steps=2, max_sequence_length=n,
                       generator=torch.Generator().manual_seed(1), output_type="np", guidance_scale=0.0).images[0]
        got = ours.generate(prompt, 48, 48, num_inference_steps=2, max_sequence_length=n,
                            generator=torch.Generator().manual_seed(1))[0].permute(1, 2, 0).numpy()
        assert abs(got - want).max() <= 1 / 255
        outs.append(got)
    assert abs(outs[0] - outs[1]).max() > 1e-3
    with pytest.raises(ValueError, match="max_sequence_length"):
        ours.generate(prompt, 48, 48, max_sequence_length=513)
