"""Dia in bfloat16 (the ``Auto`` dtype on CPUs with fast bf16 matmuls): the decoder's
linears are prepacked (and served by whatever small-row kernel the core picks), so its
logits must stay a bf16 computation of the float32 model: as close to the plain bf16 model
as bf16 rounding allows, and no further from float32 than the plain bf16 model is."""
from __future__ import annotations

import pytest
import torch

from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.packed import PackedLinear, can_prepack
from mistralrs_core.testing.parity import max_rel_err

from mistralrs_arch_speech.loader import load_dia
from mistralrs_arch_speech.pipeline import encode_text

import tiny_dia
from test_dia_parity import TEXT, OneRequest
from tiny_dia import BOS, DELAY


def _logits(model, steps: int = 8) -> torch.Tensor:
    run = OneRequest(model, encode_text(TEXT))
    g = torch.Generator().manual_seed(3)
    frame = torch.full((len(DELAY),), BOS)
    out = []
    for _ in range(steps):
        out.append(run.step(frame).float())
        frame = torch.randint(0, 16, (len(DELAY),), generator=g)
    return torch.stack(out)


@pytest.mark.skipif(not can_prepack(torch.bfloat16, "cpu"), reason="this torch/CPU does not prepack bf16")
def test_bf16_decoder_is_a_bf16_computation_of_the_float32_model(tmp_path, monkeypatch):
    path = tiny_dia.write_dia(tiny_dia.make_reference_dia(), tmp_path / "dia")
    want = _logits(load_dia(path, torch.float32))
    packed = load_dia(path, torch.bfloat16)
    decoder_linears = [m for m in packed.decoder.modules() if isinstance(m, Linear)]
    assert decoder_linears and all(isinstance(m.qmethod, PackedLinear) for m in decoder_linears)
    monkeypatch.setenv("MISTRALRS_PREPACK", "0")
    plain = load_dia(path, torch.bfloat16)
    assert all(m.qmethod is None for m in plain.decoder.modules() if isinstance(m, Linear))
    got, base = _logits(packed), _logits(plain)
    assert max_rel_err(got, base) <= 3e-2
    assert max_rel_err(got, want) <= max(1.5 * max_rel_err(base, want), 2e-2), \
        (max_rel_err(got, want), max_rel_err(base, want))
