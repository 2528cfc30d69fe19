"""The small-M dense kernel (``kernels/dense.py``, ``csrc/dense_small_m*.cpp``) against a
float64 reference of the same bf16/f16 inputs, every variant this CPU runs and every epilogue.

Bound asserted per output: the kernel keeps the sum in float32 and rounds once, so with E
the exact value (float64 from the same inputs) and F the kernel's float32 value before the
rounding, |F - E| <= d, where d = 1.2 (K + 4) 2^-24 (sum_k |x_k w_k| + |bias|) + 2^-23 |other|
(at most K + 4 float32 roundings of partial sums each bounded by the sum of magnitudes, 1.2
for gelu_tanh's slope, one rounding for the residual add), and the output Y = round(F)
lies within half a unit in the last place of F: |Y - E| <= ulp(|E| + d) / 2 + d. That is one
rounding of the exactly rounded result when d is small against the ulp, and it fails on
any wrong element, row, column, bias, residual or activation (those are off by far more).
"""
import math

import pytest
import torch

from mistralrs_quant.kernels import cpp

pytestmark = pytest.mark.skipif(not cpp.available(), reason="C++ kernels unavailable")

from mistralrs_quant.kernels import dense  # noqa: E402

_MANT = {torch.bfloat16: 8, torch.float16: 11}


def _impls(dtype):
    isa = dense.isa()
    out = ["scalar", "auto"]
    if isa["avx512"]:
        out.append("avx512")
    if isa["avx512bf16"] and dtype == torch.bfloat16:
        out.append("avx512bf16")
    if isa["amx"] and dtype == torch.bfloat16:
        out.append("amx")
    return out


def _reference(x, w, bias, act, other):
    xd, wd = x.double(), w.double()
    e = xd @ wd.T
    mag = xd.abs() @ wd.abs().T
    if bias is not None:
        e = e + bias.double()
        mag = mag + bias.double().abs()
    if act == "gelu_tanh":
        e = torch.nn.functional.gelu(e, approximate="tanh")
    d = 1.2 * (x.shape[1] + 4) * 2.0 ** -24 * mag
    if other is not None:
        e = e + other.double()
        d = d + 2.0 ** -23 * other.double().abs()
    return e, d


def _check(y, x, w, bias, act, other, what):
    assert y.dtype == w.dtype and y.shape == (x.shape[0], w.shape[0]), what
    e, d = _reference(x, w, bias, act, other)
    mag = e.abs() + d
    exp = torch.floor(torch.log2(mag.clamp_min(2.0 ** -100)))
    if w.dtype == torch.float16:
        exp = exp.clamp_min(-14)                    # f16 subnormals share the smallest ulp
    half_ulp = torch.pow(2.0, exp - _MANT[w.dtype])
    err = (y.double() - e).abs()
    bad = err > half_ulp + d
    assert not bad.any(), (f"{what}: {int(bad.sum())} outputs beyond the bound, worst "
                           f"{float((err - half_ulp - d).max()):.3g} over")


def _data(m, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(m, k + 7, generator=g).to(dtype)
    x = big[:, 3:3 + k]                              # row stride k + 7: not contiguous
    w = (torch.randn(n, k, generator=g) * 0.3).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    other = torch.randn(m, n, generator=g).to(dtype)
    return x, w, bias, other


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_the_float64_reference(dtype):
    for impl in _impls(dtype):
        for m in list(range(1, 18)) + [40]:             # 40: AMX's activation rows in three tiles
            n, k = (37, 70) if m % 2 else (131, 17)     # N odd and across tiles; K no multiple of 16/32
            x, w, bias, other = _data(m, n, k, dtype, seed=m)
            for b, act, o in ((None, None, None), (bias, None, None), (bias, "gelu_tanh", None),
                              (None, "gelu_tanh", None), (bias, None, other), (None, None, other)):
                y = dense.mm(x, w, b, act, o, impl=impl)
                _check(y, x, w, b, act, o, f"{dtype} {impl} m={m} bias={b is not None} act={act} "
                                           f"other={o is not None}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bound_weight_and_edge_layouts(dtype):
    """The per-layer bound call equals ``mm``; a column-strided x and a strided residual
    are taken; the result does not depend on the thread count (each output is summed by
    one thread in one order)."""
    x, w, bias, other = _data(5, 300, 96, dtype, seed=9)
    bound = dense.kernel.bind(w)
    assert torch.equal(bound(x.contiguous(), bias, "gelu_tanh"), dense.mm(x, w, bias, "gelu_tanh"))
    xt = x.t().contiguous().t()                      # stride(1) != 1
    assert torch.equal(bound(xt, None, None, other), dense.mm(x.contiguous(), w, None, None, other))
    wide = torch.cat([other, other], 1)[:, :300]      # residual with row stride 600
    assert torch.equal(bound(x, bias, None, wide), dense.mm(x, w, bias, None, other))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bound(x, bias, "gelu_tanh")
        torch.set_num_threads(2)
        assert torch.equal(bound(x, bias, "gelu_tanh"), one)
    finally:
        torch.set_num_threads(threads)


def test_special_values_and_errors():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, 0.25]], dtype=torch.bfloat16)
    x = torch.tensor([[float("nan"), 1.0], [1.0, 1.0]], dtype=torch.bfloat16)
    for impl in _impls(torch.bfloat16):
        y = dense.mm(x, w, impl=impl)
        assert y[0].isnan().all() and torch.equal(y[1], torch.tensor([3.0, 7.0, 0.75], dtype=torch.bfloat16))
        big = torch.full((1, 2), 200.0, dtype=torch.bfloat16)        # gelu of large +/- values
        g = dense.mm(big, torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.bfloat16), act="gelu_tanh",
                     impl=impl)
        assert g[0, 0].item() == 400.0 and g[0, 1].item() == 0.0 and not math.copysign(1, g[0, 1].item()) > 0
    with pytest.raises(ValueError, match="act"):
        dense.mm(x, w, act="relu")
    with pytest.raises(ValueError, match="x must be"):
        dense.mm(x[:, :1], w)
    with pytest.raises(ValueError, match="w must be"):
        dense.mm(x.float(), w.float())
    with pytest.raises(ValueError, match="other must be"):
        dense.mm(x, w, other=torch.zeros(2, 2, dtype=torch.bfloat16))
    for impl in ("avx512bf16", "amx"):
        if dense.isa()[impl]:
            with pytest.raises(RuntimeError, match="unsupported"):
                dense.mm(x.half(), w.half(), impl=impl)
    assert dense.mm(x[:0], w).shape == (0, 3)


def test_plugin_serves_small_m_layers(monkeypatch):
    """Registered through the plugin hook: a ``small_m`` layer on an AVX-512 CPU gets this
    kernel for a few rows and gives the kernel's numbers."""
    from mistralrs_core import plugins
    from mistralrs_core.layers.dense_kernels import ENV
    from mistralrs_core.layers.packed import DenseWeight
    monkeypatch.delenv(ENV, raising=False)
    plugins.reset()
    assert "cpp" in plugins.get_registry().dense_kernels
    x, w, bias, other = _data(2, 50, 64, torch.bfloat16, seed=3)
    d = DenseWeight(w, small_m=True)
    if not dense.isa()["avx512"]:
        assert d.kernel is None
        return
    assert d.kernel is dense.kernel and d.packed is None
    assert torch.equal(d.mm(x, bias, "gelu_tanh"), dense.mm(x, w, bias, "gelu_tanh"))
    assert torch.equal(d.mm_add(x, other, bias), dense.mm(x, w, bias, None, other))


def test_declines_without_the_library(monkeypatch):
    """With the C++ kernels disabled the plugin's kernel declines, so a small_m layer is
    prepacked for oneDNN as before."""
    from mistralrs_core.layers.packed import DenseWeight
    monkeypatch.setenv(cpp.ENV_DISABLE, "1")
    assert not dense.kernel.supports(torch.bfloat16, "cpu")
    assert not dense.kernel.supports(torch.float32, "cpu")
    d = DenseWeight(torch.randn(8, 16).bfloat16(), small_m=True)
    assert d.kernel is None and d.packed is not None
