"""The transformer's CPU half-precision path (``packed=True``): prepacked linears with bias,
tanh-GELU and the single blocks' output sum in GEMM epilogues; and the shared q/k norm +
rope. Its layout math equals diffusers in float32 (where nothing is packed, so
the split layout itself is what is checked); in bf16 the packed model equals the plain one
to bf16 rounding, and the loader packs exactly when it computes on a CPU in half precision."""
from __future__ import annotations

import pytest
import torch

from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.packed import PackedLinear, can_prepack
from mistralrs_core.loading.weights import load_module

from mistralrs_arch_diffusion import flux_transformer as ft
from mistralrs_arch_diffusion.loader import load_flux
from mistralrs_arch_diffusion.pipeline import latent_image_ids


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _inputs(tr, dtype):
    g = torch.Generator().manual_seed(3)
    h2, w2, n_txt = 3, 5, 7
    x = torch.randn(2, h2 * w2, tr.config.in_channels, generator=g).to(dtype)
    txt = torch.randn(2, n_txt, tr.config.joint_attention_dim, generator=g).to(dtype)
    pooled = torch.randn(2, tr.config.pooled_projection_dim, generator=g).to(dtype)
    guidance = torch.tensor([3.5, 2.0]) if tr.config.guidance_embeds else None
    return dict(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled,
                timestep=torch.tensor([0.9, 0.3]), img_ids=latent_image_ids(h2, w2),
                txt_ids=torch.zeros(n_txt, 3), guidance=guidance)


def _ours(tr, dtype, packed):
    m = ft.FluxTransformer2DModel(ft.FluxConfig.from_hf(dict(tr.config)), packed=packed)
    load_module(m, list(tr.state_dict().items()), device=torch.device("cpu"), dtype=dtype)
    return m


def _run(m, inp):
    with torch.inference_mode():
        return m(inp["hidden_states"], inp["encoder_hidden_states"], inp["pooled_projections"], inp["timestep"],
                 img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], guidance=inp["guidance"])


@pytest.mark.parametrize("variant", ["schnell", "dev"])
def test_packed_layout_equals_diffusers_in_float32(tiny_flux_models, variant):
    tr = tiny_flux_models[variant][0].transformer
    ours = _ours(tr, torch.float32, packed=True)
    blk = ours.single_transformer_blocks[0]
    assert blk.linear1 is None and blk.qkv is not None and blk.out_attn is not None and blk.out_mlp is not None
    assert not hasattr(blk, "proj_out")
    inp = _inputs(tr, torch.float32)
    with torch.no_grad():
        want = tr(**inp, return_dict=False)[0]
    assert rel(_run(ours, inp), want) <= 1e-4


@pytest.mark.skipif(not can_prepack(torch.bfloat16, "cpu"), reason="this torch/CPU does not prepack bf16")
def test_packed_bf16_equals_the_plain_bf16_model(tiny_flux_models, monkeypatch):
    tr = tiny_flux_models["dev"][0].transformer
    plain = _ours(tr, torch.bfloat16, packed=False)
    packed = _ours(tr, torch.bfloat16, packed=True)
    n = packed.prepack()
    linears = [m for m in packed.modules() if isinstance(m, Linear)]
    assert n == len(linears) and all(isinstance(m.qmethod, PackedLinear) for m in linears)
    inp = _inputs(tr, torch.bfloat16)
    with torch.no_grad():
        want = tr.to(torch.float32)(**{k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
                                      for k, v in inp.items()}, return_dict=False)[0]
    got, base = _run(packed, inp), _run(plain, inp)
    # Both are bf16 computations of the float32 reference: the packed one is no further off.
    assert rel(got, base) <= 3e-2
    assert rel(got, want) <= max(1.5 * rel(base, want), 2e-2)


def test_norm_rope_equals_the_textbook_form():
    """Per-part RMSNorm, concatenation, then x * cos + rotate_pairs(x) * sin, in float64."""
    from mistralrs_core.layers.rope import rotate_pairs
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 9, 3, 3, 16, generator=g)          # a strided q, as the fused projection gives it
    xs = [torch.randn(2, 5, 3, 16, generator=g), qkv[:, :, 0]]
    ws = [torch.randn(16, generator=g) for _ in xs]
    ids = torch.cat([torch.zeros(5, 3), latent_image_ids(3, 3)], 0)
    freqs = ft.rope_freqs(ids, (4, 6, 6))
    got = ft._norm_rope(xs, ws, 1e-6, freqs)
    parts = [x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
             for x, w in zip(xs, ws)]
    x = torch.cat(parts, 1)
    cos = freqs.real.double().repeat_interleave(2, -1)[None, :, None]
    sin = freqs.imag.double().repeat_interleave(2, -1)[None, :, None]
    want = x * cos + rotate_pairs(x) * sin
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max().item() <= 1e-6 * want.abs().max().item()
    bf = ft._norm_rope([x_.bfloat16() for x_ in xs], ws, 1e-6, freqs)
    assert bf.dtype == torch.bfloat16 and rel(bf, want) <= 2 ** -7


def test_loader_packs_only_for_half_precision_on_cpu(tiny_flux_models, monkeypatch):
    folder = tiny_flux_models["schnell"][1]
    f32 = load_flux(folder, name="t", dtype=torch.float32, device=torch.device("cpu"), offload=False)
    assert not f32.transformer.packed and f32.transformer.single_transformer_blocks[0].linear1 is not None
    monkeypatch.setenv("MISTRALRS_PREPACK", "0")
    off = load_flux(folder, name="t", dtype=torch.bfloat16, device=torch.device("cpu"), offload=False)
    assert not off.transformer.packed
    if can_prepack(torch.bfloat16, "cpu"):
        monkeypatch.setenv("MISTRALRS_PREPACK", "1")
        on = load_flux(folder, name="t", dtype=torch.bfloat16, device=torch.device("cpu"), offload=False)
        assert on.transformer.packed
        assert isinstance(on.transformer.proj_out.qmethod, PackedLinear)
