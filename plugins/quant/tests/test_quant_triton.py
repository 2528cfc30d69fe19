"""The Triton kernels under ``TRITON_INTERPRET=1`` on CPU, against the torch paths.

Contracts tested (tiny shapes: the interpreter runs every program in numpy):
* dequantize: bit-identical to the torch dequantizers (``formats``), every ggml block type,
  AFQ 2/3/4/6/8 and HQQ 4/8.
* matmul (GEMV for M ≤ 8, GEMM above), float32: ``|y − x·Wᵀ| ≤ 1e-5 · (|x|·|W|ᵀ)`` with W
  the torch dequantization — only the summation order differs (the qlinear contract);
  bfloat16: ``2⁻⁷ · (|x|·|W|ᵀ)``, float16: ``2⁻⁹ · (|x|·|W|ᵀ)`` (the GEMM rounds the weight
  tile to x's dtype as the torch path rounds the dequantized weight).
* paged-attention decode: float32 within 1e-5 relative of the torch backend, called through
  the core's decode-attention seam (``MISTRALRS_DECODE_ATTENTION=triton``).
* dispatch: the QuantMethods route to the kernels only for devices in ``DEVICE_TYPES``,
  ``MISTRALRS_TRITON=0`` turns them off, and nothing imports triton before it is needed.
"""
import os
import sys

# triton reads TRITON_INTERPRET when it is first imported (its own language functions are
# decorated then). If an earlier module of this session already imported it (peft does),
# the interpreter cannot be switched on any more: this file then runs in a fresh process.
_PRELOADED = "triton" in sys.modules
_SAVED = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # restored after this module (triton reads it lazily too)

import re  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

pytest.importorskip("triton")

from mistralrs_quant.formats import GGML_TYPES  # noqa: E402
from mistralrs_quant.formats.afq import AFQMethod  # noqa: E402
from mistralrs_quant.formats.hqq import HQQMethod  # noqa: E402
from mistralrs_quant.kernels.triton import dispatch  # noqa: E402
from mistralrs_quant.kernels.triton import paged_attention  # noqa: E402,F401
from mistralrs_quant.kernels.triton import quant_matmul as qm  # noqa: E402
from mistralrs_quant.qlinear import GGMLQuantMethod  # noqa: E402
from quant_blocks import BLOCK_TYPES, random_raw  # noqa: E402

BOUND = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -9}
N = 7  # odd: the last column tile is partial


def _check(y, x, w, dtype):
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    err = (y.double() - ref).abs()
    assert (err <= BOUND[dtype] * scale + 1e-30).all(), float((err / (scale + 1e-30)).max())


def _ggml(qtype, rng):
    spec = GGML_TYPES[int(qtype)]
    blocks = 1 if spec.block_size == 256 else 4  # K = 256 or 128
    raw = torch.from_numpy(random_raw(qtype, N, blocks, rng))
    return raw, spec, blocks * spec.block_size


_PRELOADED = _PRELOADED and type(sys.modules["triton"].language.zeros).__name__ != "InterpretedFunction"


@pytest.fixture(autouse=True, scope="module")
def _restore_env():
    yield
    if _SAVED is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED


@pytest.fixture(autouse=True)
def _interpreted(request):
    if _PRELOADED and request.node.name != "test_in_fresh_process":
        pytest.skip("triton was imported before the interpreter could be enabled: "
                    "test_in_fresh_process runs this file")


def _in_fresh_process():
    """(Collected only when needed: see ``_PRELOADED``.)"""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    print(summary)
    # Everything (this test is not collected there: that process enabled the interpreter itself).
    assert re.match(r"\d+ passed in", summary), summary


if _PRELOADED:
    test_in_fresh_process = _in_fresh_process


@pytest.fixture
def on_cpu(monkeypatch):
    """Let the dispatch send CPU tensors to the (interpreted) kernels."""
    monkeypatch.setattr(dispatch, "DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.delenv(dispatch.ENV, raising=False)


# ------------------------------------------------------------------ quantized matmuls

@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_ggml_dequantize_and_matmul(qtype, rng):
    raw, spec, k = _ggml(qtype, rng)
    view = qm.ggml_view(raw, int(qtype), spec.block_size, spec.type_size)
    ref = spec.dequantize(raw)
    w = qm.dequantize(view)
    assert torch.equal(w, ref)
    for m in (1, 3, 17):  # GEMV up to 8 rows, GEMM beyond (a partial row tile)
        x = torch.randn(m, k)
        _check(qm.matmul(x, view), x, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q6_K], ids=lambda t: t.name)
def test_ggml_matmul_half(qtype, dtype, rng):
    """x, the weight tile (GEMM) and y rounded to the half type: each 2⁻⁹ (bf16) or 2⁻¹¹ (f16)."""
    raw, spec, k = _ggml(qtype, rng)
    view = qm.ggml_view(raw, int(qtype), spec.block_size, spec.type_size)
    ref = spec.dequantize(raw)
    for m in (2, 17):
        x = torch.randn(m, k).to(dtype)
        y = qm.matmul(x, view)
        assert y.dtype == dtype
        _check(y, x.float(), ref, dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_afq(bits):
    torch.manual_seed(bits)
    method = AFQMethod.from_float(torch.randn(N, 128), bits, group_size=32)
    view = qm.afq_view(method.w_q, method.scales, method.biases, bits, 32)
    ref = method.dequantize()
    assert torch.equal(qm.dequantize(view), ref)
    for m in (1, 17):
        x = torch.randn(m, 128)
        _check(qm.matmul(x, view), x, ref, torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_hqq(bits):
    torch.manual_seed(bits)
    method = HQQMethod.from_float(torch.randn(N, 128), bits, group_size=64, steps=2)
    view = qm.hqq_view(method.w_q, method.scales, method.zeros, N, 128, bits, 64)
    ref = method.dequantize()
    assert torch.equal(qm.dequantize(view), ref)
    for m in (1, 17):
        x = torch.randn(m, 128)
        _check(qm.matmul(x, view), x, ref, torch.float32)


def test_hqq_tensor_parallel_shards():
    """A tensor-parallel HQQ shard is an HQQ layer of its own (a row shard's group size is
    its band count, 32 here): the kernels read it as any other."""
    torch.manual_seed(3)
    method = HQQMethod.from_float(torch.randn(128, 96), 4, steps=2)
    for shard in (method.take_rows([(0, 64)]), method.take_cols(32, 96)):
        loc = shard.local
        view = qm.hqq_view(loc.w_q, loc.scales, loc.zeros, loc.out_features, loc.in_features, 4, loc.group_size)
        ref = shard.dequantize()
        assert torch.equal(qm.dequantize(view), ref)
        x = torch.randn(3, loc.in_features)
        _check(qm.matmul(x, view), x, ref, torch.float32)


# ------------------------------------------------------------------ dispatch

def test_ggml_method_uses_triton_on_kernel_devices(on_cpu, rng, monkeypatch):
    raw, spec, k = _ggml(T.Q4_K, rng)
    m = GGMLQuantMethod(raw, T.Q4_K, compute_dtype=torch.bfloat16, cpp=False)
    assert m.choose_path(1) == "triton" and m.choose_path(64) == "triton"
    assert m.dense is None and m.int4 is None  # the kernels read the ggml bytes: no copies
    assert torch.equal(m.dequantize(), spec.dequantize(raw))
    x = torch.randn(2, 3, k)
    y = m.forward(x)
    assert y.shape == (2, 3, N) and y.dtype == torch.bfloat16
    _check(y.reshape(-1, N), x.reshape(-1, k).bfloat16().float(), spec.dequantize(raw), torch.bfloat16)

    monkeypatch.setenv(dispatch.ENV, "0")
    off = GGMLQuantMethod(raw, T.Q4_K, compute_dtype=torch.float32, cpp=False)
    assert "triton" not in off.available_paths()


def test_cpu_paths_unchanged_without_kernel_device(rng):
    raw, _, _ = _ggml(T.Q8_0, rng)
    assert "triton" not in GGMLQuantMethod(raw, T.Q8_0, compute_dtype=torch.float32).available_paths()
    assert not dispatch.use_triton(torch.zeros(1))


@pytest.mark.parametrize("kind", ["afq", "hqq"])
def test_afq_hqq_forward_dispatch(kind, on_cpu, monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(N, 128)
    method = AFQMethod.from_float(w, 4, group_size=64) if kind == "afq" else HQQMethod.from_float(w, 4, steps=2)
    calls = []
    real = dispatch.matmul
    monkeypatch.setattr(dispatch, "matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn(2, 128)
    y = method.forward(x)
    assert calls and y.shape == (2, N)
    _check(y, x, method.dequantize(), torch.float32)
    monkeypatch.setenv(dispatch.ENV, "0")
    calls.clear()
    method.forward(x)
    assert not calls


def test_no_triton_import_until_needed():
    """CPU-only installs: the plugin imports and runs with triton absent."""
    code = (
        "import sys, torch\n"
        "import mistralrs_quant.qlinear, mistralrs_quant.formats.afq, mistralrs_quant.formats.hqq\n"
        "import mistralrs_quant.kernels.triton.dispatch as d\n"
        "assert 'triton' not in sys.modules, 'triton imported at module import'\n"
        "sys.modules['triton'] = None  # now behave as if it were not installed\n"
        "d.DEVICE_TYPES.add('cpu')\n"
        "assert not d.use_triton(torch.zeros(1))\n"
        "from mistralrs_quant.formats.afq import AFQMethod\n"
        "m = AFQMethod.from_float(torch.randn(4, 64), 4, group_size=64)\n"
        "assert m.forward(torch.randn(1, 64)).shape == (1, 4)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# ------------------------------------------------------------------ paged-attention decode

def _decode_step(hq, hkv, d, page, ctx_lens, dtype=torch.float32, seed=0):
    """A cache holding each sequence's past keys in shuffled blocks, and the metadata of a
    decode step (one new token per sequence) on top of it."""
    from mistralrs_core.layers.attention import AttentionMetadata, KVCacheSpec, LayerKVCache
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum(-(-n // page) for n in ctx_lens) + 2
    cache = LayerKVCache(KVCacheSpec(hkv, d, d), n_blocks, page, dtype, "cpu")
    perm = torch.randperm(n_blocks, generator=g).tolist()
    tables, slots = [], []
    for n in ctx_lens:
        blocks = [perm.pop() for _ in range(-(-n // page))]
        tables.append(blocks)
        past = torch.tensor([blocks[p // page] * page + p % page for p in range(n - 1)], dtype=torch.long)
        if n > 1:
            cache.write(past, torch.randn(n - 1, hkv, d, generator=g), torch.randn(n - 1, hkv, d, generator=g))
        slots.append(blocks[(n - 1) // page] * page + (n - 1) % page)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
    b = len(ctx_lens)
    meta = AttentionMetadata(query_lens=[1] * b, context_lens=list(ctx_lens),
                             slot_mapping=torch.tensor(slots), block_tables=bt, token_index=torch.arange(b),
                             q_max=1, k_max=max(ctx_lens))
    q = torch.randn(b, hq, d, generator=g)
    k, v = torch.randn(b, hkv, d, generator=g), torch.randn(b, hkv, d, generator=g)
    return q, k, v, meta, cache


@pytest.mark.parametrize("case", [
    dict(),
    dict(sliding_window=5),
    dict(softcap=2.0),
    dict(sinks=True),
    dict(chunk=8),
    dict(fp8=True),
    dict(hq=4, hkv=4, d=8, page=16),   # no GQA, one page per sequence
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_paged_decode_attention(case, monkeypatch):
    """Against the torch backend (float32): GQA with 3 query heads per KV head (padded to 4),
    a 12-wide head (padded to 16), pages of 3 tokens, contexts from 1 to 23 tokens."""
    import copy

    from mistralrs_core.layers.attention import FP8_CACHE_DTYPE, attention
    from mistralrs_core.layers.decode_kernels import ENV, is_pure_decode
    case = dict(case)
    fp8 = case.pop("fp8", False)
    hq, hkv, d, page = case.pop("hq", 6), case.pop("hkv", 2), case.pop("d", 12), case.pop("page", 3)
    if case.pop("sinks", False):
        case["sinks"] = torch.randn(hq)
    q, k, v, meta, cache = _decode_step(hq, hkv, d, page, [7, 1, 23, 12], FP8_CACHE_DTYPE if fp8 else torch.float32)
    assert is_pure_decode(meta, cache)
    ref_cache = copy.deepcopy(cache)
    ref = attention(q, k, v, meta, ref_cache, scale=d ** -0.5, **case)  # CPU: the torch path
    calls = []
    real = paged_attention.paged_decode_attention
    monkeypatch.setattr(paged_attention, "paged_decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setenv(ENV, "triton")  # the core's seam, told to use the kernel on CPU
    out = attention(q, k, v, meta, cache, scale=d ** -0.5, **case)
    assert calls == [1]
    assert torch.equal(cache.k, ref_cache.k) and torch.equal(cache.v, ref_cache.v)  # the new token written
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_paged_attention_prefill_and_cpu_use_torch_path(monkeypatch):
    """Only decode steps on kernel devices reach the kernel."""
    from mistralrs_core.layers.attention import attention
    from mistralrs_core.layers.decode_kernels import ENV, is_pure_decode
    from mistralrs_quant.kernels.triton import paged_attention as pa
    q, k, v, meta, cache = _decode_step(4, 2, 8, 4, [5, 9])
    monkeypatch.setattr(pa, "paged_decode_attention", lambda *a, **kw: pytest.fail("kernel used"))
    monkeypatch.delenv(ENV, raising=False)
    attention(q, k, v, meta, cache, scale=0.3)  # CPU not a kernel device
    monkeypatch.setenv(ENV, "triton")
    monkeypatch.setenv(dispatch.ENV, "0")
    attention(q, k, v, meta, cache, scale=0.3)  # MISTRALRS_TRITON=0: the kernel declines
    monkeypatch.delenv(dispatch.ENV)
    meta.query_lens = [2, 0]  # not one token per sequence: a prefill/mixed step
    assert not is_pure_decode(meta, cache)
