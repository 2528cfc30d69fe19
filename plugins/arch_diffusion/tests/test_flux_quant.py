"""The transformer's linears reach the core quantization hook (``in_situ_quant`` / a
``QuantConfig``), in both checkpoint layouts: a quantizer plugin sees every DiT linear by its
diffusers name, and a model whose linears it holds generates the same image as the dense one
with the same round-tripped weights."""
from __future__ import annotations

import types

import pytest
import torch

from mistralrs_core.hookspecs import hookimpl
from mistralrs_core.loading.quant_config import QuantConfig
from mistralrs_core.plugins import get_plugin_manager, register_plugin

from mistralrs_arch_diffusion.loader import load_flux


class _RoundTrip:
    """A stand-in quantized method: bf16-rounded weights, computed in float32."""

    def __init__(self, weight):
        self.q = weight.to(torch.bfloat16)
        self.out_features, self.in_features = weight.shape

    def forward(self, x):
        return torch.nn.functional.linear(x, self.q.to(x.dtype))

    def dequantize(self):
        return self.q.float()


@pytest.fixture
def quantizer():
    seen = []

    @hookimpl
    def mistralrs_quant_method(quant_config, hf_name, module, weight):
        if quant_config.kind == "isq" and quant_config.for_layer(hf_name, module) == "bf16rt":
            seen.append(hf_name)
            return _RoundTrip(weight)
        return None

    register_plugin(types.SimpleNamespace(mistralrs_quant_method=mistralrs_quant_method), "bf16-roundtrip")
    yield seen
    get_plugin_manager().unregister(name="bf16-roundtrip")


@pytest.mark.parametrize("layout", [1, 2])
def test_dit_linears_go_through_the_quant_hook(tiny_flux_models, quantizer, layout):
    _, folder, single = tiny_flux_models["dev"]
    path = folder if layout == 1 else single
    qc = QuantConfig.isq("bf16rt")
    pipe = load_flux(path, name="q", dtype=torch.float32, device=torch.device("cpu"), offload=False, seed=0,
                     quant_config=qc)
    tr = pipe.transformer
    names = set(quantizer)
    assert "transformer_blocks.0.attn.to_q" in names and "single_transformer_blocks.1.proj_mlp" in names
    assert "time_text_embed.guidance_embedder.linear_1" in names and "proj_out" in names
    # Every Linear of the transformer is packed (no dense weight left), none of the text encoders'.
    from mistralrs_core.layers.linear import Linear
    linears = [m for m in tr.modules() if isinstance(m, Linear)]
    assert linears and all(m.qmethod is not None and m.weight is None for m in linears)
    assert not any(n.startswith(("encoder.", "text_model.", "decoder.")) for n in names)
    # A dense load whose transformer weights went through the same rounding gives the same image.
    dense = load_flux(path, name="d", dtype=torch.float32, device=torch.device("cpu"), offload=False, seed=0)
    with torch.no_grad():
        for m in dense.transformer.modules():
            if isinstance(m, Linear):
                m.weight.copy_(m.weight.to(torch.bfloat16).float())
    a = pipe.generate("a cat", 32, 48, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    b = dense.generate("a cat", 32, 48, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert (a - b).abs().max() <= 1e-5
