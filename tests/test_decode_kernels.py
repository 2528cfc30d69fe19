"""The decode-attention seam (``layers/decode_kernels.py``) with a fake in-process kernel:
which calls reach a registered kernel, the switch, the torch fallback, registration errors."""
import copy
import types

import pytest
import torch

from mistralrs_core import plugins
from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.hookspecs import hookimpl
from mistralrs_core.layers.attention import KVCacheSpec, LayerKVCache, attention
from mistralrs_core.layers.decode_kernels import ENV, is_pure_decode


class FakeKernel:
    """Answers with a marker (the torch result + 1000) so the test sees who served a call."""

    def __init__(self, accept=True):
        self.accept, self.calls, self.asked = accept, [], 0

    def supports(self, q, cache, meta, **options):
        self.asked += 1
        return self.accept

    def __call__(self, q, cache, meta, *, scale, **options):
        self.calls.append(options)
        kc, vc = cache.gather(meta.block_tables, meta.k_max)  # the step's K/V must be there already
        ref = _torch_decode(q, kc, vc, meta, scale)
        return ref + 1000.0


def _torch_decode(q, kc, vc, meta, scale):
    out = []
    for b, n in enumerate(meta.context_lens):
        k, v = kc[b, :n].repeat_interleave(q.shape[1] // kc.shape[2], 1), vc[b, :n].repeat_interleave(
            q.shape[1] // vc.shape[2], 1)
        p = torch.softmax(torch.einsum("hd,khd->hk", q[b], k) * scale, -1)
        out.append(torch.einsum("hk,khd->hd", p, v))
    return torch.stack(out)


@pytest.fixture
def fake(monkeypatch):
    """A plugin registering ``FakeKernel``s for CPU ("fake") and for CUDA only ("cudaonly")."""
    kernel, cuda_only = FakeKernel(), FakeKernel()

    @hookimpl
    def mistralrs_register_decode_attention(register):
        register("fake", kernel, device_types=("cpu",))
        register("cudaonly", cuda_only, device_types=("cuda",))
    monkeypatch.delenv(ENV, raising=False)
    plugin = types.SimpleNamespace(mistralrs_register_decode_attention=mistralrs_register_decode_attention)
    plugins.register_plugin(plugin, "fake_decode_kernel")
    try:
        assert "fake_decode_kernel" not in plugins.failed_plugins()
        yield kernel, cuda_only
    finally:
        plugins.reset()


def _step(ctx_lens, *, hq=4, hkv=2, d=8, page=4, seed=0):
    """A cache holding each sequence's first n-1 tokens and the decode step that adds the n-th."""
    g = torch.Generator().manual_seed(seed)
    per = [-(-n // page) for n in ctx_lens]
    cache = LayerKVCache(KVCacheSpec(hkv, d, d), sum(per) + 1, page, torch.float32, "cpu")
    blocks, nxt = [], 1
    for n in per:
        blocks.append(list(range(nxt, nxt + n))[::-1])  # not in order, block 0 unused
        nxt += n
    _, _, pre = build_metadata([([0] * (n - 1), 0, bl) for n, bl in zip(ctx_lens, blocks)], page, "cpu")
    cache.write(pre.slot_mapping, torch.randn(sum(ctx_lens) - len(ctx_lens), hkv, d, generator=g),
                torch.randn(sum(ctx_lens) - len(ctx_lens), hkv, d, generator=g))
    _, _, meta = build_metadata([([0], n - 1, bl) for n, bl in zip(ctx_lens, blocks)], page, "cpu")
    b = len(ctx_lens)
    q, k, v = (torch.randn(b, h, d, generator=g) for h in (hq, hkv, hkv))
    return q, k, v, meta, cache


def test_pure_decode_on_a_listed_device_reaches_the_kernel(fake):
    kernel, cuda_only = fake
    q, k, v, meta, cache = _step([5, 1, 11])
    ref_cache = copy.deepcopy(cache)
    out = attention(q, k, v, meta, cache, scale=0.3, sliding_window=4)
    assert kernel.calls == [dict(sliding_window=4, softcap=None, sinks=None, chunk=None)]
    assert cuda_only.asked == 0                        # CPU tensors: not a device it listed
    # the step's K/V written as the torch path writes them, then the kernel's answer returned
    full = _torch_decode(q, *_written(ref_cache, meta, k, v), meta, 0.3)
    assert torch.equal(cache.k, ref_cache.k) and torch.equal(cache.v, ref_cache.v)
    torch.testing.assert_close(out, full + 1000.0)


def test_other_steps_and_caches_stay_on_the_torch_path(fake):
    kernel, _ = fake
    q, k, v, meta, cache = _step([5, 3])
    # prefill (several queries per sequence)
    _, _, pre = build_metadata([([1, 2, 3], 0, [0]), ([4, 5], 0, [1])], 4, "cpu")
    attention(torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8), pre, cache, scale=0.3)
    # a non-causal (embedding) step, bidirectional spans, a wrapped cache, no cache
    for change in (dict(causal=False), dict(bidirectional_spans=[[(0, 5)], []])):
        m = copy.copy(meta)
        m._masks = {}
        for key, val in change.items():
            setattr(m, key, val)
        assert not is_pure_decode(m, cache)
        attention(q, k, v, m, cache, scale=0.3)

    class Wrapped:
        def __init__(self, c):
            self.c = c

        def write(self, *a):
            pass

        def gather(self, *a):
            return self.c.gather(*a)
    attention(q, k, v, meta, Wrapped(cache), scale=0.3)
    attention(q, k, v, meta, None, scale=0.3)
    assert kernel.asked == 0 and kernel.calls == []
    # verified drafts: two queries for one sequence
    _, _, spec = build_metadata([([7, 8], 3, [1, 2])], 4, "cpu")
    attention(torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8), spec, cache, scale=0.3)
    assert kernel.asked == 0


def test_declining_kernel_falls_back_to_torch(fake):
    kernel, _ = fake
    kernel.accept = False
    q, k, v, meta, cache = _step([6, 2])
    ref_cache = copy.deepcopy(cache)
    torch.testing.assert_close(attention(q, k, v, meta, cache, scale=0.3),
                               _torch_decode(q, *_written(ref_cache, meta, k, v), meta, 0.3), rtol=1e-6, atol=1e-6)
    assert kernel.asked == 1 and kernel.calls == []


def _written(cache, meta, k, v):
    cache.write(meta.slot_mapping, k, v)
    return cache.gather(meta.block_tables, meta.k_max)


def test_switch_names_a_kernel_or_turns_them_off(fake, monkeypatch):
    kernel, cuda_only = fake
    q, k, v, meta, cache = _step([3, 4])
    monkeypatch.setenv(ENV, "torch")
    attention(q, k, v, meta, cache, scale=0.3)
    assert kernel.asked == 0
    monkeypatch.setenv(ENV, "CudaOnly")        # named: used on CPU too
    out = attention(q, k, v, meta, cache, scale=0.3)
    assert len(cuda_only.calls) == 1 and kernel.asked == 0 and float(out.min()) > 100
    monkeypatch.setenv(ENV, "auto")
    attention(q, k, v, meta, cache, scale=0.3)
    assert len(kernel.calls) == 1
    monkeypatch.setenv(ENV, "nosuch")
    with pytest.raises(ValueError, match=r"MISTRALRS_DECODE_ATTENTION='nosuch'.*cudaonly, fake"):
        attention(q, k, v, meta, cache, scale=0.3)


def test_registration_errors_fail_the_plugin():
    @hookimpl
    def mistralrs_register_decode_attention(register):
        register("bad", "x:y", device_types="cuda")   # a str, not a sequence of names

    @hookimpl
    def dup(register):
        register("triton", "x:y", device_types=("cuda",))
    try:
        bad = types.SimpleNamespace(mistralrs_register_decode_attention=mistralrs_register_decode_attention)
        plugins.register_plugin(bad, "bad_decode_kernel")
        plugins.register_plugin(types.SimpleNamespace(mistralrs_register_decode_attention=dup), "dup_decode_kernel")
        failed = plugins.failed_plugins()
        assert "device_types" in failed["bad_decode_kernel"]
        if "triton" in plugins.get_registry().decode_attention:   # the quant plugin is installed
            assert "decode-attention kernel 'triton' is registered by both" in failed["dup_decode_kernel"]
        assert "decode-attention kernels:" in plugins.describe()
    finally:
        plugins.reset()


def test_core_alone_runs_the_torch_path(monkeypatch):
    """No plugin installed (MISTRALRS_PLUGINS=none): decode steps run torch; naming a kernel
    that nobody registered is a clear error."""
    monkeypatch.setenv(plugins.ENV_ALLOWLIST, "none")
    monkeypatch.delenv(ENV, raising=False)
    plugins.reset()
    try:
        assert plugins.get_registry().decode_attention == {}
        q, k, v, meta, cache = _step([4, 7])
        ref_cache = copy.deepcopy(cache)
        out = attention(q, k, v, meta, cache, scale=0.3)
        torch.testing.assert_close(out, _torch_decode(q, *_written(ref_cache, meta, k, v), meta, 0.3),
                                   rtol=1e-6, atol=1e-6)
        monkeypatch.setenv(ENV, "triton")
        with pytest.raises(ValueError, match="none registered"):
            attention(q, k, v, meta, cache, scale=0.3)
    finally:
        plugins.reset()
