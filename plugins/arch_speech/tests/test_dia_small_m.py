"""Dia in bf16 with its linears on the small-M kernel (``prepack_linears(small_m=True)`` in
the loader, the quant plugin's kernel when installed) against the same checkpoint on
oneDNN's packed path (``MISTRALRS_DENSE_KERNEL=torch``): both are compared with the float32
model, and the kernel's logits may be no further from it than the packed path's (plus a
margin of bf16 noise): a wrong epilogue, row or layer would be far off."""
from __future__ import annotations

import pytest
import torch

from mistralrs_core.layers.dense_kernels import ENV
from mistralrs_core.layers.packed import can_prepack
from mistralrs_core.testing.parity import max_rel_err

from mistralrs_arch_speech.loader import load_dia
from mistralrs_arch_speech.pipeline import encode_text

import tiny_dia
from test_dia_parity import TEXT, OneRequest
from tiny_dia import BOS, DELAY

pytestmark = pytest.mark.skipif(not can_prepack(torch.bfloat16, "cpu"), reason="no oneDNN bf16 prepacking")


def _logits(model, steps=5):
    run = OneRequest(model, encode_text(TEXT))
    g = torch.Generator().manual_seed(5)
    frame, out = torch.full((len(DELAY),), BOS), []
    for _ in range(steps):
        with torch.no_grad():
            out.append(run.step(frame).float())
        frame = torch.randint(0, 16, (len(DELAY),), generator=g)
    return run.enc.float(), torch.stack(out)


def test_bf16_decoder_on_the_small_m_kernel_is_as_close_as_the_packed_path(tmp_path, monkeypatch):
    path = tiny_dia.write_dia(tiny_dia.make_reference_dia(), tmp_path / "dia")
    ref_enc, ref = _logits(load_dia(path))
    monkeypatch.setenv(ENV, "torch")
    packed = load_dia(path, dtype=torch.bfloat16)
    monkeypatch.setenv(ENV, "auto")
    small = load_dia(path, dtype=torch.bfloat16)
    kernels = [m.qmethod.weight.kernel for m in small.modules() if getattr(m, "qmethod", None) is not None]
    assert kernels and all(k is None for m in packed.modules() if getattr(m, "qmethod", None) is not None
                           for k in [m.qmethod.weight.kernel])
    p_enc, p = _logits(packed)
    s_enc, s = _logits(small)
    if all(k is None for k in kernels):
        pytest.skip("no small-M kernel registered for bf16 on this CPU (the quant plugin declines)")
    e_packed, e_small = max_rel_err(p, ref), max_rel_err(s, ref)
    assert e_packed < 0.1                     # bf16 against float32: a sane baseline
    assert e_small <= 1.5 * e_packed + 0.01, (e_small, e_packed)
    assert max_rel_err(s, p) <= 0.02          # one float32 sum rounded once on both paths
    assert max_rel_err(s_enc, ref_enc) <= 1.5 * max_rel_err(p_enc, ref_enc) + 0.01
