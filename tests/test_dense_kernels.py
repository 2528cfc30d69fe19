"""The small-M dense-kernel seam (``layers/dense_kernels.py``) with a fake in-process kernel:
which layers and calls reach it, the switch, a declining kernel, the wide-M path, and the
core alone (no plugin) behaving as before."""
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core import plugins
from mistralrs_core.hookspecs import hookimpl
from mistralrs_core.layers.dense_kernels import ENV, kernel_for
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.packed import DenseWeight, PackedLinear, can_prepack, prepack_linears

pytestmark = pytest.mark.skipif(not can_prepack(torch.bfloat16, "cpu"),
                                reason="this torch has no oneDNN linear prepacking")


class FakeKernel:
    """Answers with the float64 result + 1000 (rounded), so a test sees who served a call."""

    def __init__(self, accept=True, rows=2):
        self.accept, self.rows, self.calls = accept, rows, []

    def supports(self, dtype, device):
        return self.accept and dtype == torch.bfloat16 and torch.device(device).type == "cpu"

    def max_rows(self, dtype):
        return self.rows

    def bind(self, w):
        def mm(x2d, bias, act, other):
            self.calls.append((x2d.shape[0], bias is not None, act, other is not None))
            y = x2d.double() @ w.double().T
            if bias is not None:
                y = y + bias.double()
            if act == "gelu_tanh":
                y = F.gelu(y, approximate="tanh")
            if other is not None:
                y = y + other.double()
            return (y + 1000).to(w.dtype)
        return mm


@pytest.fixture
def fake(monkeypatch):
    kernel, declining = FakeKernel(), FakeKernel(accept=False)

    @hookimpl
    def mistralrs_register_dense_kernels(register):
        register("fake", kernel, device_types=("cpu",))
        register("declines", declining, device_types=("cpu",))
    monkeypatch.setenv(ENV, "fake")
    plugins.register_plugin(types.SimpleNamespace(mistralrs_register_dense_kernels=mistralrs_register_dense_kernels),
                            "fake_dense_kernel")
    try:
        assert "fake_dense_kernel" not in plugins.failed_plugins()
        yield kernel
    finally:
        plugins.reset()


def _w(n=24, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()


def test_small_calls_reach_the_kernel_and_wide_ones_run_torch(fake):
    w, b = _w()
    d = DenseWeight(w, small_m=True)
    assert d.kernel is fake and d.packed is None and d.plain is not None      # held once, plain
    x = torch.randn(2, 40).bfloat16()
    other = torch.randn(2, 24).bfloat16()
    ref = F.linear(x.double(), w.double(), b.double())
    assert torch.equal(d.mm(x, b, "gelu_tanh"), (F.gelu(ref, approximate="tanh") + 1000).bfloat16())
    assert torch.equal(d.mm_add(x, other, b), (ref + other.double() + 1000).bfloat16())
    assert fake.calls == [(2, True, "gelu_tanh", False), (2, True, None, True)]
    # More rows than the kernel takes: torch on the plain weight, same numbers as the
    # packed path to bf16 rounding (W @ x.T, then the epilogue ops one by one).
    packed = DenseWeight(w)
    for rows in (7, 70):                      # W @ x.T below 64 rows, x @ W.T from 64
        xs = torch.randn(rows, 40).bfloat16()
        wide = F.linear(xs.float(), w.float(), b.float())
        for got, want in ((d.mm(xs, b), wide), (d.mm(xs, b, "gelu_tanh"), F.gelu(wide, approximate="tanh")),
                          (d.mm_add(xs, torch.ones(rows, 24).bfloat16(), b), wide + 1)):
            assert got.shape == (rows, 24) and got.is_contiguous()
            assert (got.float() - want).abs().max() <= want.abs().max() * 2 ** -6
        assert (packed.mm(xs, b).float() - d.mm(xs, b).float()).abs().max() <= wide.abs().max() * 2 ** -6
    with pytest.raises(ValueError, match="act"):
        d.mm(xs, b, "relu6")
    assert len(fake.calls) == 2


def test_prepack_linears_opts_in_per_model(fake):
    def model():
        m = nn.Sequential(Linear(40, 24, bias=True), Linear(24, 8))
        for i, lin in enumerate(m):
            w, b = _w(lin.weight.shape[0], lin.weight.shape[1], seed=i)
            lin.weight = nn.Parameter(w, requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(b, requires_grad=False)
        return m
    default, small = model(), model()
    assert prepack_linears(default) == 2 and prepack_linears(small, small_m=True) == 2
    assert all(isinstance(lin.qmethod, PackedLinear) and lin.weight is None for lin in small)
    assert all(lin.qmethod.weight.kernel is None for lin in default)            # opt-in only
    x = torch.randn(1, 2, 40).bfloat16()
    small(x)
    assert [c[0] for c in fake.calls] == [2, 2]
    default(x)
    assert len(fake.calls) == 2


def test_switch_declining_and_unknown_names(fake, monkeypatch):
    w, _ = _w()
    monkeypatch.setenv(ENV, "torch")
    d = DenseWeight(w, small_m=True)
    assert d.kernel is None and d.packed is not None                           # exactly as before
    monkeypatch.setenv(ENV, "declines")
    d = DenseWeight(w, small_m=True)
    assert d.kernel is None and d.packed is not None
    assert kernel_for(torch.float16, "cpu") is None                             # fake takes bf16 only
    monkeypatch.setenv(ENV, "nosuch")
    with pytest.raises(ValueError, match="names no registered dense kernel"):
        DenseWeight(w, small_m=True)
    monkeypatch.setenv(ENV, "fake")
    assert DenseWeight(w.float(), small_m=True).kernel is None                 # float32: never
    assert DenseWeight(w, prepack=False, small_m=True).kernel is None
    assert "dense kernels:" in plugins.describe()


def test_registration_errors_fail_the_plugin():
    @hookimpl
    def mistralrs_register_dense_kernels(register):
        register("bad", "x:y", device_types="cpu")        # a str, not a sequence of names
    try:
        plugins.register_plugin(types.SimpleNamespace(mistralrs_register_dense_kernels=mistralrs_register_dense_kernels),
                                "bad_dense_kernel")
        assert "device_types of dense kernel 'bad'" in plugins.failed_plugins()["bad_dense_kernel"]
    finally:
        plugins.reset()


def test_core_alone_keeps_the_packed_path(monkeypatch):
    """No plugin (MISTRALRS_PLUGINS=none): ``small_m`` changes nothing; auto picks a
    registered kernel by device type once one is there."""
    monkeypatch.setenv(plugins.ENV_ALLOWLIST, "none")
    monkeypatch.delenv(ENV, raising=False)
    plugins.reset()
    try:
        w, _ = _w()
        assert plugins.get_registry().dense_kernels == {}
        d = DenseWeight(w, small_m=True)
        assert d.kernel is None and d.packed is not None
        cuda_only = FakeKernel()

        @hookimpl
        def mistralrs_register_dense_kernels(register):
            register("cudaonly", cuda_only, device_types=("cuda",))
            register("cpu", FakeKernel(), device_types=("cpu",))
        plugins.register_plugin(types.SimpleNamespace(mistralrs_register_dense_kernels=mistralrs_register_dense_kernels),
                                "fake_dense_auto")
        d = DenseWeight(w, small_m=True)
        assert d.kernel is not None and d.kernel is not cuda_only
    finally:
        plugins.reset()
