"""Each Flux component against diffusers/transformers on tiny random configs with every
parameter perturbed (float32, <= 1e-4 relative), plus tokenizers, packing and seeding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_flux

from mistralrs_arch_diffusion.loader import load_flux
from mistralrs_arch_diffusion.pipeline import latent_image_ids, pack_latents, unpack_latents
from mistralrs_arch_diffusion.scheduler import FlowMatchConfig, flow_match_schedule

LONG_PROMPT = " ".join(tiny_flux.WORDS * 12)


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module", params=["schnell", "dev"])
def pair(request, tiny_flux_models):
    ref, folder, _ = tiny_flux_models[request.param]
    ours = load_flux(folder, name="t", dtype=torch.float32, device=torch.device("cpu"), offload=False, seed=0)
    return ref, ours


@pytest.mark.parametrize("prompt", [tiny_flux.PROMPT, "A  Blue SKY over   green hills!", LONG_PROMPT])
def test_tokenizers_match_the_reference(pair, prompt):
    ref, ours = pair
    want = ref.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert ours.clip_tokenizer.encode(prompt) == want
    for n in (16, 64):
        want2 = ref.tokenizer_2(prompt, padding="max_length", max_length=n, truncation=True).input_ids
        assert ours.t5_tokenizer.encode(prompt, n) == want2


def test_clip_tokenizer_json_path_matches_vocab_and_merges(tiny_flux_models, tmp_path):
    from mistralrs_arch_diffusion.prompt_tokenizers import load_clip_tokenizer

    ref = tiny_flux_models["schnell"][0]
    folder = tiny_flux.save(ref, tmp_path / "m", clip_tokenizer_json=True)
    with_json = load_clip_tokenizer(folder / "tokenizer")
    assert (folder / "tokenizer" / "tokenizer.json").is_file()
    from_files = load_clip_tokenizer(tiny_flux_models["schnell"][1] / "tokenizer")
    for p in (tiny_flux.PROMPT, LONG_PROMPT):
        assert with_json.encode(p) == from_files.encode(p)


def test_t5_encoder(pair):
    ref, ours = pair
    # 64 tokens: offsets past max_exact use the logarithmic buckets and the max-distance clamp.
    ids = torch.tensor([ref.tokenizer_2(LONG_PROMPT, padding="max_length", max_length=64,
                                        truncation=True).input_ids])
    with torch.no_grad():
        want = ref.text_encoder_2(ids)[0]
        got = ours.t5(ids)
    assert rel(got, want) <= 1e-4


def test_t5_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    from mistralrs_arch_diffusion.t5 import relative_position_buckets

    rel_pos = torch.arange(-300, 300)[None, :]
    for nb, md in ((32, 128), (8, 20)):
        want = T5Attention._relative_position_bucket(rel_pos, bidirectional=True, num_buckets=nb, max_distance=md)
        assert torch.equal(relative_position_buckets(rel_pos, nb, md), want)


def test_clip_text_encoder(pair):
    ref, ours = pair
    ids = torch.tensor([ref.tokenizer(tiny_flux.PROMPT, padding="max_length", max_length=77,
                                      truncation=True).input_ids])
    with torch.no_grad():
        want = ref.text_encoder(ids)
        hidden, pooled = ours.clip(ids)
    assert rel(hidden, want.last_hidden_state) <= 1e-4
    assert rel(pooled, want.pooler_output) <= 1e-4


def test_transformer_forward(pair):
    ref, ours = pair
    tr = ref.transformer
    g = torch.Generator().manual_seed(3)
    h2, w2, n_txt = 3, 5, 7
    x = torch.randn(2, h2 * w2, 16, generator=g)
    txt = torch.randn(2, n_txt, 24, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    t = torch.tensor([0.9, 0.3])
    img_ids = latent_image_ids(h2, w2)
    txt_ids = torch.zeros(n_txt, 3)
    guidance = torch.tensor([3.5, 2.0]) if tr.config.guidance_embeds else None
    with torch.no_grad():
        want = tr(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                  img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        got = ours.transformer(x, txt, pooled, t, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance)
    assert rel(got, want) <= 1e-4


def test_vae_decode(pair):
    ref, ours = pair
    z = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref.vae.decode(z / ref.vae.config.scaling_factor + ref.vae.config.shift_factor).sample
        got = ours.vae.decode(z)
    assert got.shape == (1, 3, 48, 80)
    assert rel(got, want) <= 1e-4


@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (512, 512), (1024, 768), (1024, 1024)])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_scheduler_sigmas_and_timesteps(hw, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
               base_image_seq_len=256, max_image_seq_len=4096)
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    seq = (hw[0] // 16) * (hw[1] // 16)
    mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flow_match_schedule(FlowMatchConfig.from_hf(cfg), steps, seq)
    assert torch.allclose(ours.sigmas, ref.sigmas, rtol=1e-4, atol=0)
    assert torch.allclose(ours.timesteps, ref.timesteps, rtol=1e-4, atol=0)
    # Without dynamic shifting the static shift applies.
    ref2 = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref2.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    ours2 = flow_match_schedule(FlowMatchConfig(shift=3.0), steps, seq)
    assert torch.allclose(ours2.sigmas, ref2.sigmas, rtol=1e-4, atol=0)


def test_packing_and_seeded_latents_match_diffusers(pair):
    from diffusers import FluxPipeline

    ref, ours = pair
    z = torch.randn(1, 4, 6, 10)
    packed = FluxPipeline._pack_latents(z, 1, 4, 6, 10)
    assert torch.equal(pack_latents(z), packed)
    assert torch.equal(unpack_latents(packed, 6, 10), z)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 48, 80, 8), unpack_latents(packed, 6, 10))
    assert torch.equal(latent_image_ids(3, 5), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    for seed in (0, 1234):
        want, _ = ref.prepare_latents(1, 4, 48, 80, torch.float32, "cpu", torch.Generator().manual_seed(seed))
        got = ours.initial_latents(48, 80, torch.Generator().manual_seed(seed))
        assert torch.equal(got, want)
