"""Prepacked bf16 linears (``layers/packed.py``): the oneDNN packed matmul equals the plain
torch path, and only the layers it is meant for are packed."""
import pytest
import torch
from torch import nn

from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.layers.packed import PackedLinear, _can_prepack, prepack_linears

pytestmark = pytest.mark.skipif(not _can_prepack(torch.zeros(1, 1, dtype=torch.bfloat16)),
                                reason="this torch has no oneDNN linear prepacking")


def linear(i, o, dtype=torch.bfloat16, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = Linear(i, o, bias=bias)
    m.weight = nn.Parameter(torch.randn(o, i, generator=g).to(dtype), requires_grad=False)
    if bias:
        m.bias = nn.Parameter(torch.randn(o, generator=g).to(dtype), requires_grad=False)
    return m


@pytest.mark.parametrize("rows", [1, 2, 7, 64, 300])
def test_packed_matmul_equals_the_plain_path(rows):
    m = linear(96, 80, bias=True)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), m.weight.float(), m.bias.float())
    plain = m(x)
    assert prepack_linears(m) == 1 and isinstance(m.qmethod, PackedLinear) and m.weight is None
    got = m(x)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 80)
    # Both round a float32 accumulation to bf16 once: equal to bf16 rounding of the exact result.
    scale = want.abs().max()
    assert (got.float() - want).abs().max() <= scale * 2 ** -7
    assert (got.float() - plain.float()).abs().max() <= scale * 2 ** -7
    # Leading dims are kept, and the weight reads back exactly.
    assert m(x.view(1, rows, 96)).shape == (1, rows, 80)
    assert torch.equal(m.qmethod.dequantize(), linear(96, 80, bias=True).weight.float())


def test_only_dense_unshared_half_precision_linears_are_packed(monkeypatch):
    emb = Embedding(50, 32)
    emb.weight = nn.Parameter(torch.randn(50, 32).to(torch.bfloat16), requires_grad=False)
    head = Linear(32, 50)
    head.weight = emb.weight                       # tied: packing would hold the table twice
    adapted = linear(32, 32, seed=1)
    adapted.lora = lambda x, y: y
    model = nn.ModuleDict(dict(emb=emb, head=head, f32=linear(32, 32, torch.float32), adapted=adapted,
                               plain=linear(32, 32, seed=2)))
    assert prepack_linears(model) == 1
    assert model["plain"].qmethod is not None
    assert all(model[k].qmethod is None for k in ("head", "f32", "adapted"))
    monkeypatch.setenv("MISTRALRS_PREPACK", "0")
    assert prepack_linears(nn.ModuleDict(dict(a=linear(32, 32)))) == 0


@pytest.mark.parametrize("rows", [1, 5, 200])
def test_epilogues_equal_the_separate_ops(rows):
    """Bias + tanh-GELU and the binary add ride in the packed GEMM's epilogue; each equals
    the float32 result of the separate ops to bf16 rounding, packed or plain."""
    from mistralrs_core.layers.packed import DenseWeight
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g).bfloat16()
    b = torch.randn(48, generator=g).bfloat16()
    x = torch.randn(rows, 64, generator=g).bfloat16()
    other = torch.randn(rows, 48, generator=g).bfloat16()
    lin = torch.nn.functional.linear(x.float(), w.float(), b.float())
    want_gelu = torch.nn.functional.gelu(lin, approximate="tanh")
    want_add = lin + other.float()
    for prepack in (True, False):
        d = DenseWeight(w, prepack=prepack)
        assert (d.packed is not None) == prepack
        got = d.mm(x, b, "gelu_tanh")
        assert (got.float() - want_gelu).abs().max() <= want_gelu.abs().max() * 2 ** -6
        got = d.mm_add(x, other, b)
        assert (got.float() - want_add).abs().max() <= want_add.abs().max() * 2 ** -6
        assert torch.equal(d.mm(x, b, None), d.mm(x, b))
    with pytest.raises(ValueError, match="act"):
        DenseWeight(w).mm(x, b, "relu6")
