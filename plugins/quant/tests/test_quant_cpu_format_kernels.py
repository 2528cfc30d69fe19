"""C++ CPU kernels of the F8Q8, FP8 and HQQ formats (kernels/qformats.py) against the
formats' torch paths (dequantize, then F.linear).

Contract: decoded weights are the torch path's float32 values (bit for bit; for HQQ
q·s − z·s rounded once, which is torch's addcmul on AVX CPUs, where it fuses), so outputs
differ only by float32 summation order: |y − y_torch| ≤ 1e-5 · (|x| @ |W|.T).
"""
import pytest
import torch

from mistralrs_quant.formats.f8q8 import F8Q8Method
from mistralrs_quant.formats.fp8 import FP8Method
from mistralrs_quant.formats.hqq import HQQMethod
from mistralrs_quant.kernels import cpp, qformats

pytestmark = pytest.mark.skipif(not cpp.available(), reason="C++ kernels unavailable")

MS = (1, 2, 7, 12, 64)   # decode (M <= 4 in registers), 4x4 dot tiles, prefill (dequant_mm)


def _weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


def _fp8_block(n, k, block, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, k, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.rand(-(-n // block[0]), -(-k // block[1]), generator=g) * 0.01 + 1e-3
    return FP8Method(q, scales, block)


def _methods():
    # odd N everywhere; K multiples of each format's group (and a K that leaves partial FP8
    # scale blocks and a 32-byte tail)
    yield "f8q8", F8Q8Method.from_float(_weight(37, 256, 1))
    yield "fp8", FP8Method.from_float(_weight(37, 200, 2))
    yield "fp8_k256", FP8Method.from_float(_weight(37, 256, 7))   # M <= 4: decoded in registers
    yield "fp8_block", _fp8_block(131, 320, (128, 128), 3)
    yield "hqq4", HQQMethod.from_float(_weight(37, 192, 4), 4, steps=2)
    yield "hqq8", HQQMethod.from_float(_weight(37, 128, 5), 8, steps=2)
    yield "hqq4_g32", HQQMethod.from_float(_weight(5, 96, 6), 4, group_size=32, steps=2)


METHODS = dict(_methods())


def _torch_weight(m):
    """The float32 weight the torch path multiplies by."""
    if isinstance(m, HQQMethod):
        w = torch.addcmul(m._neg_zero_scales(), m._codes().to(torch.float32), m.scales)
        return w.reshape(m.out_features, m.in_features)
    return m.dequantize()


def _assert_close(y, ref, x, w):
    bound = x.abs().double().reshape(-1, w.shape[1]) @ w.abs().double().T
    err = (y.double().reshape(bound.shape) - ref.double().reshape(bound.shape)).abs()
    assert (err <= 1e-5 * bound + 1e-30).all(), float((err / bound.clamp_min(1e-30)).max())


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("m_rows", MS)
def test_forward_matches_torch_path(name, m_rows):
    m = METHODS[name]
    x = torch.randn(m_rows, m.in_features, generator=torch.Generator().manual_seed(m_rows))
    y = m.forward(x)
    assert m._cpu_kernel is not None, "the kernel path was not taken"
    assert y.dtype == torch.float32 and y.shape == (m_rows, m.out_features)
    _assert_close(y, m.forward_torch(x), x, _torch_weight(m))


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("impl", ["auto", "scalar", "avx2", "avx512"])
def test_decoded_weights_are_the_torch_paths(name, impl):
    if impl != "auto" and impl not in qformats.variants():
        pytest.skip(f"this CPU does not run the {impl} variant")
    m = METHODS[name]
    m.forward(torch.zeros(1, m.in_features))
    k = m._cpu_kernel.with_impl(impl)
    got, want = k.dequantize(), _torch_weight(m)
    if isinstance(m, HQQMethod):
        # q·s + (−z·s) rounded once (torch's addcmul fuses it on AVX CPUs, then ``want`` is
        # the same bits): computed in float64, where the product and sum are exact here
        codes = m._codes().to(torch.float64)
        want = (codes * m.scales.double() + m._neg_zero_scales().double()).float()
        want = want.reshape(m.out_features, m.in_features)
    assert torch.equal(got, want)
    x = torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(7))
    _assert_close(k.mm(x), m.forward_torch(x), x, want)
    bf = k.dequantize_rows(0, k.n, torch.empty(k.n, k.k, dtype=torch.bfloat16))
    assert torch.equal(bf, k.dequantize_rows(0, k.n, torch.empty(k.n, k.k)).to(torch.bfloat16))


@pytest.mark.parametrize("name", ["f8q8", "fp8", "fp8_block", "hqq4"])
@pytest.mark.parametrize("m_rows", [1, 40])
def test_bfloat16_activations(name, m_rows):
    m = METHODS[name]
    x = torch.randn(2, m_rows, m.in_features, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y = m.forward(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, m_rows, m.out_features)
    ref = torch.nn.functional.linear(x.float(), _torch_weight(m))
    bound = x.float().abs() @ _torch_weight(m).abs().T
    assert ((y.float() - ref).abs() <= 2 ** -7 * bound + 1e-30).all()


def test_uqff_round_trip_layers_use_the_kernels():
    for name in ("f8q8", "fp8", "hqq4", "hqq8"):
        m = METHODS[name]
        loaded = type(m).from_uqff_tensors(m.to_uqff_tensors())
        x = torch.randn(2, m.in_features, generator=torch.Generator().manual_seed(11))
        y = loaded.forward(x)
        assert loaded._cpu_kernel is not None
        assert torch.equal(y, m.forward(x)), name


def test_concat_and_column_shards():
    a, b = F8Q8Method.from_float(_weight(9, 128, 8)), F8Q8Method.from_float(_weight(7, 128, 9))
    fused = F8Q8Method.concat([a, b])
    x = torch.randn(2, 128)
    _assert_close(fused.forward(x), torch.cat([a.forward_torch(x), b.forward_torch(x)], -1), x,
                  fused.dequantize())
    part = a.take_cols(32, 96)
    _assert_close(part.forward(x[:, 32:96]), part.forward_torch(x[:, 32:96]), x[:, 32:96], part.dequantize())


def test_wrong_input_size_is_a_value_error():
    m = F8Q8Method.from_float(_weight(5, 64, 10))
    with pytest.raises(ValueError, match="features"):
        m.forward(torch.randn(1, 32))


def test_env_switch_keeps_the_torch_path(monkeypatch):
    monkeypatch.setenv(cpp.ENV_DISABLE, "1")
    m = HQQMethod.from_float(_weight(5, 64, 12), 8, steps=1)
    x = torch.randn(1, 64)
    assert torch.equal(m.forward(x), m.forward_torch(x))
    assert m._cpu_kernel is None
