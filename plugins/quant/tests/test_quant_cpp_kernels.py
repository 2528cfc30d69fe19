"""The C++ ggml kernels (kernels/cpp.py): exactness against the float64 reference, bit-exact
dequantization, the qlinear "cpp" path, and the fallbacks when the kernels are off.

Accuracy contract of ``matmul`` (ref = ``x @ dequantize(raw).T`` in float64): every weight
is decoded to exactly its reference float32 value, so only float32 summation error is
left: 16 lanes each accumulate K/16 products, then a 16-way tree, giving
``|y − ref| ≤ (K/16 + 4) · 2⁻²⁴ · (|x| @ |W|.T)``; the tests check the looser 1e-5
of qlinear's float32 contract (K ≤ 2048 keeps the bound below it).

The library is built (or loaded from ~/.cache) once, by the session fixture; the compile
time is printed in pytest's terminal summary (see conftest.py).
"""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from mistralrs_quant.formats import GGML_TYPES
from mistralrs_quant.kernels import cpp
from mistralrs_quant.qlinear import GGMLQuantMethod
from quant_blocks import random_raw, set_scale

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
REL = 1e-5


@pytest.fixture(scope="session")
def kernels():
    if not cpp.available():
        pytest.skip(f"C++ kernels unavailable: {cpp.unavailable_reason()}")
    return cpp.build_info()


@pytest.fixture(scope="session")
def impls(kernels):
    return ["scalar"] + (["avx512"] if kernels["isa"] == "avx512" else [])


def _raw(qtype, rows, cols, rng):
    spec = GGML_TYPES[int(qtype)]
    return torch.from_numpy(random_raw(qtype, rows, cols // spec.block_size, rng))


def _check(y, x, w):
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    err = (y.double() - ref).abs()
    assert (err <= REL * scale + 1e-30).all(), float((err / (scale + 1e-30)).max())


def test_build_is_cached_and_reported(kernels):
    from pathlib import Path
    assert Path(kernels["path"]).is_file() and kernels["seconds"] >= 0
    assert kernels["isa"] in ("avx512", "scalar")
    assert Path(kernels["path"]).parent == cpp.cache_dir()
    assert set(cpp.BLOCKS) == {int(t) for t in TYPES}
    for t in TYPES:  # the C++ block table agrees with formats
        spec = GGML_TYPES[int(t)]
        assert cpp.BLOCKS[int(t)] == (spec.block_size, spec.type_size)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_matches_float64_reference(qtype, impls, rng):
    spec = GGML_TYPES[int(qtype)]
    # 37 rows: no multiple of any tile or thread split; K = 512 (two 256-blocks), and for
    # the 32-blocks also K = 96.
    for k in ([512] if spec.block_size == 256 else [96, 512]):
        raw = _raw(qtype, 37, k, rng)
        w = spec.dequantize(raw)
        for m in (1, 3, 8, 13, 16):  # register blocks of 8 rows, odd tails, 16 broadcast lanes
            x = torch.randn(m, k)
            for impl in impls:
                y = cpp.matmul(x, raw, qtype, impl=impl)
                assert y.shape == (m, 37) and y.dtype == torch.float32
                _check(y, x, w)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(qtype, impls, rng):
    spec = GGML_TYPES[int(qtype)]
    raw = _raw(qtype, 21, 512, rng)
    ref = spec.dequantize(raw)
    ids = torch.tensor([20, 0, 7, 7])
    for impl in impls:
        full = cpp.dequantize(raw, qtype, impl=impl)
        assert torch.equal(full.view(torch.int32), ref.view(torch.int32))  # bits: -0.0 too
        assert torch.equal(cpp.dequantize(raw, qtype, ids, impl=impl).view(torch.int32), ref[ids].view(torch.int32))
        bf16 = cpp.dequantize(raw, qtype, impl=impl, dtype=torch.bfloat16)
        assert torch.equal(bf16.view(torch.int16), ref.bfloat16().view(torch.int16))
    with pytest.raises(RuntimeError, match="out of range"):
        cpp.dequantize(raw, qtype, torch.tensor([21]))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_edge_scales(qtype, impls, rng):
    """Subnormal, zero, negative-zero and infinite f16 scales decode as the reference."""
    from quant_blocks import same_bits
    spec = GGML_TYPES[int(qtype)]
    for bits in (0x0001, 0x03FF, 0x0000, 0x8000, 0x7C00, 0xFC00):
        raw = random_raw(qtype, 3, 512 // spec.block_size, rng)
        raw = torch.from_numpy(set_scale(raw, qtype, 0, bits))
        ref = spec.dequantize(raw).numpy()
        for impl in impls:
            assert same_bits(cpp.dequantize(raw, qtype, impl=impl).numpy(), ref), (hex(bits), impl)


def test_threads_do_not_change_results(kernels, rng):
    """Threads split the output rows; each row's summation order is fixed, so the result
    is bit-identical for any thread count."""
    raw = _raw(T.Q4_K, 300, 1024, rng)
    x = torch.randn(5, 1024)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp.matmul(x, raw, T.Q4_K)
        torch.set_num_threads(2)
        two = cpp.matmul(x, raw, T.Q4_K)
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(one, two)


def test_shapes_and_inputs(kernels, rng):
    raw = _raw(T.Q8_0, 9, 64, rng)
    w = GGML_TYPES[int(T.Q8_0)].dequantize(raw)
    assert cpp.matmul(torch.randn(0, 64), raw, T.Q8_0).shape == (0, 9)
    xb = torch.randn(2, 64).bfloat16()  # converted exactly to float32 first
    _check(cpp.matmul(xb, raw, T.Q8_0), xb.float(), w)
    xs = torch.randn(64, 2).t()  # non-contiguous
    _check(cpp.matmul(xs, raw, T.Q8_0), xs, w)
    strided = torch.from_numpy(random_raw(T.Q8_0, 9, 4, rng))[:, :68]  # rows 136 bytes apart
    x = torch.randn(3, 64)
    _check(cpp.matmul(x, strided, T.Q8_0), x, GGML_TYPES[int(T.Q8_0)].dequantize(strided.contiguous()))
    with pytest.raises(ValueError, match="no C\\+\\+ kernel"):
        cpp.matmul(torch.randn(1, 64), raw, T.Q2_K)
    with pytest.raises(ValueError, match="x must be"):
        cpp.matmul(torch.randn(1, 32), raw, T.Q8_0)


def test_real_smollm2_weights(kernels, smollm2_path):
    from mistralrs_quant.gguf_reader import open_gguf
    f = open_gguf(smollm2_path)
    for name in ("blk.0.ffn_down.weight", "blk.3.attn_k.weight", "token_embd.weight"):
        info = f.tensors[name]
        raw = info.raw_tensor().reshape(info.shape[0], -1)[:256]
        w = GGML_TYPES[info.ggml_type].dequantize(raw)
        x = torch.randn(3, w.shape[1])
        _check(cpp.matmul(x, raw, info.ggml_type), x, w)
        assert torch.equal(cpp.dequantize(raw, info.ggml_type, torch.tensor([5, 1])), w[[5, 1]])


# Byte range of the codes inside a block, for the formats whose value is a * code + b.
CODE_BYTES = {T.Q4_1: (4, 20), T.Q4_K: (16, 144)}


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K], ids=lambda t: t.name)
def test_integer_variant_within_activation_rounding_bound(qtype, kernels, rng):
    """impl="vnni" (opt-in): activations rounded to int8 per 32 (|x - dx q| <= amax/254),
    everything else exact, so |y - ref| <= sum_i amax(block(i))/254 * |w_i - b_i| where b is
    the block offset of min formats (Q4_1, Q4_K; 0 for the others) plus float32 rounding."""
    if not kernels["vnni"]:
        pytest.skip("no AVX-512 VNNI on this CPU")
    spec = GGML_TYPES[int(qtype)]
    raw = _raw(qtype, 45, 512, rng)
    w = spec.dequantize(raw).double()
    b = torch.zeros_like(w)
    if qtype in CODE_BYTES:  # b = the value of code 0
        lo, hi = CODE_BYTES[qtype]
        zeroed = raw.clone().reshape(-1, spec.type_size)
        zeroed[:, lo:hi] = 0
        b = spec.dequantize(zeroed.reshape(raw.shape)).double()
    for m in (1, 3, 10):
        x = torch.randn(m, 512) * torch.rand(m, 512) ** 4  # uneven magnitudes per block
        y = cpp.matmul(x, raw, qtype, impl="vnni").double()
        ref = x.double() @ w.T
        amax = x.abs().reshape(m, -1, 32).amax(-1, keepdim=True).expand(m, 16, 32).reshape(m, 512).double()
        bound = 1.01 * amax @ (w - b).abs().T / 254 + REL * (x.double().abs() @ w.abs().T)
        assert ((y - ref).abs() <= bound).all(), float(((y - ref).abs() / bound).max())
    with pytest.raises(RuntimeError, match="unsupported"):
        cpp.matmul(torch.randn(1, 512), _raw(T.Q6_K, 4, 512, rng), T.Q6_K, impl="vnni")


# ------------------------------------------------------------------ qlinear integration

def test_qlinear_cpp_path(kernels, rng):
    raw = _raw(T.Q4_1, 40, 512, rng)
    w = GGML_TYPES[int(T.Q4_1)].dequantize(raw)
    m = GGMLQuantMethod(raw, T.Q4_1, compute_dtype=torch.bfloat16)
    # Only the ggml bytes are held: no int4 or dense copy.
    assert m.available_paths() == ["cpp", "dequant"] and m.nbytes == raw.nbytes
    assert m.choose_path(1) == "cpp" and m.choose_path(m.cpp_max_m) == "cpp"
    assert m.choose_path(m.cpp_max_m + 1) == "dequant"
    x = torch.randn(1, 7, 512)
    y = m.forward(x)
    assert y.shape == (1, 7, 40) and y.dtype == torch.float32  # float32 whatever compute_dtype
    _check(y.reshape(-1, 40), x.reshape(-1, 512), w)
    big = torch.randn(m.cpp_max_m + 3, 512)
    assert m.forward(big).dtype == torch.bfloat16  # the large-M path computes in compute_dtype
    ids = torch.tensor([[3, 0], [39, 3]])
    assert torch.equal(m.embedding(ids), w[ids])
    assert torch.equal(m.dequantize(), w)


def test_qlinear_concat(kernels, rng):
    # Without the kernels (cpp=False) same-type parts concatenate into one method.
    parts = [GGMLQuantMethod(_raw(T.Q5_0, r, 256, rng), T.Q5_0, compute_dtype=torch.float32, cpp=False)
             for r in (8, 4, 4)]
    fused = GGMLQuantMethod.concat(parts)
    x = torch.randn(2, 256)
    assert torch.equal(fused.forward(x), torch.cat([p.forward(x) for p in parts], -1))
    other = GGMLQuantMethod(_raw(T.Q8_0, 4, 256, rng), T.Q8_0, compute_dtype=torch.float32, cpp=False)
    assert GGMLQuantMethod.concat(parts + [other]) is None
    # With the kernels they stay apart: no copy of the mapped rows.
    bound = [GGMLQuantMethod(_raw(T.Q5_0, r, 256, rng), T.Q5_0, compute_dtype=torch.float32) for r in (8, 4)]
    assert GGMLQuantMethod.concat(bound) is None


def test_float32_compute_uses_cpp(kernels, rng):
    raw = _raw(T.Q6_K, 24, 512, rng)
    m = GGMLQuantMethod(raw, T.Q6_K, compute_dtype=torch.float32)
    assert m.choose_path(1) == "cpp"
    x = torch.randn(40, 512)  # large M: float32 matmul over C++-decoded tiles
    _check(m.forward(x), x, m.dequantize())


def test_impl_choice(kernels, monkeypatch, rng):
    monkeypatch.setenv(cpp.ENV_IMPL, "vnni")
    q41 = GGMLQuantMethod(_raw(T.Q4_1, 8, 64, rng), T.Q4_1)
    q6k = GGMLQuantMethod(_raw(T.Q6_K, 8, 256, rng), T.Q6_K)
    assert q41.cpp.impl_name == ("vnni" if kernels["vnni"] else "auto")
    assert q6k.cpp.impl_name == "auto"  # no integer kernel for Q6_K: the exact one
    assert GGMLQuantMethod(_raw(T.Q4_1, 8, 64, rng), T.Q4_1, cpp_impl="auto").cpp.impl_name == "auto"
    monkeypatch.setenv(cpp.ENV_IMPL, "fastest")
    with pytest.raises(ValueError, match="unknown C\\+\\+ kernel implementation"):
        GGMLQuantMethod(_raw(T.Q4_1, 8, 64, rng), T.Q4_1)


# ------------------------------------------------------------------ fallbacks

def test_env_var_disables_kernels(monkeypatch, rng):
    monkeypatch.setenv(cpp.ENV_DISABLE, "1")
    assert not cpp.available() and "MISTRALRS_QUANT_NO_CPP" in cpp.unavailable_reason()
    raw = _raw(T.Q4_1, 32, 256, rng)
    m = GGMLQuantMethod(raw, T.Q4_1, compute_dtype=torch.bfloat16)
    assert "cpp" not in m.available_paths() and m.choose_path(1) != "cpp"
    x = torch.randn(2, 256)
    y = m.forward(x)
    assert y.dtype == torch.bfloat16
    exact = GGML_TYPES[int(T.Q4_1)].dequantize(raw)
    ref = x.double() @ exact.double().T
    assert ((y.double() - ref).abs() <= 2.0 ** -7 * (x.abs().double() @ exact.abs().double().T)).all()
    with pytest.raises(RuntimeError, match="unavailable"):
        GGMLQuantMethod(raw, T.Q4_1, cpp=True)
    with pytest.raises(RuntimeError, match="unavailable"):
        cpp.matmul(x, raw, T.Q4_1)


def test_build_failure_falls_back(monkeypatch, rng, caplog):
    monkeypatch.delenv(cpp.ENV_DISABLE, raising=False)
    monkeypatch.setattr(cpp, "_state", cpp._State())

    def no_compiler():
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(cpp, "_build", no_compiler)
    with caplog.at_level("WARNING", logger="mistralrs_quant.kernels.cpp"):
        assert not cpp.available()
        assert not cpp.available()  # tried once, logged once
    assert "g++ not found" in cpp.unavailable_reason()
    assert sum("g++ not found" in r.getMessage() for r in caplog.records) == 1
    m = GGMLQuantMethod(_raw(T.Q8_0, 16, 64, rng), T.Q8_0, compute_dtype=torch.float32)
    assert m.available_paths() == ["dequant"]
