"""GGMLQuantMethod: every path's forward against dequantize-then-matmul, embeddings, sizes."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from mistralrs_quant.formats import GGML_TYPES, quantize
from mistralrs_quant.kernels import int4pack
from mistralrs_quant.qlinear import GGMLQuantMethod, GGUFQuantizedWeight
from quant_blocks import BLOCK_TYPES, FLOAT_TYPES, random_raw

# Documented in qlinear: error relative to sum |x||W|, per compute dtype.
BOUND = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -7}


def _check(y, x, w, dtype):
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    err = (y.double() - ref).abs()
    assert (err <= BOUND[dtype] * scale + 1e-30).all(), float((err / (scale + 1e-30)).max())


def _weight(qtype, rows, cols, rng):
    spec = GGML_TYPES[int(qtype)]
    return torch.from_numpy(random_raw(qtype, rows, cols // spec.block_size, rng))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", FLOAT_TYPES + BLOCK_TYPES, ids=lambda t: t.name)
def test_forward_matches_dequantized_matmul(qtype, dtype, rng):
    raw = _weight(qtype, 40, 512, rng)  # 40 rows: not a multiple of the int4 kernel's 16-row tiles... nor 64
    m = GGMLQuantMethod(raw, qtype, compute_dtype=dtype)
    w = m.dequantize()
    assert w.shape == (40, 512) and w.dtype == torch.float32
    if m.raw is not None:
        assert torch.equal(w, GGML_TYPES[int(qtype)].dequantize(raw))
    for shape in [(1, 512), (3, 7, 512), (20, 512)]:
        x = torch.randn(shape)
        for path in m.available_paths():
            y = m.forward(x, path)
            out_dtype = torch.float32 if path == "cpp" else dtype  # cpp computes in float32
            assert y.shape == (*shape[:-1], 40) and y.dtype == out_dtype
            _check(y.reshape(-1, 40), x.reshape(-1, 512), w, out_dtype)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K], ids=lambda t: t.name)
def test_int4_kernel_path(qtype, rng):
    if not int4pack.kernel_available():
        pytest.skip("torch has no CPU int4 kernel")
    cols = 512
    for rows in (16, 33, 300):  # exact tile, padded tail, several packing chunks
        raw = _weight(qtype, rows, cols, rng)
        m = GGMLQuantMethod(raw, qtype, compute_dtype=torch.bfloat16, cpp=False)
        assert m.available_paths() == ["int4", "dequant"]
        assert m.choose_path(1) == "int4" and m.choose_path(m.int4_max_m + 1) == "dequant"
        w = m.dequantize()
        x = torch.randn(5, cols)
        _check(m.forward(x, "int4"), x, w, torch.bfloat16)
        # The only approximation is bf16 scale/zero: int4 and dequant paths agree closely.
        yd = m.forward(x, "dequant").float()
        yi = m.forward(x, "int4").float()
        assert (yi - yd).abs().max() <= 2.0 ** -6 * (x.abs() @ w.abs().T).max()


def test_int4_kernel_exact_with_representable_scales():
    """With scales/zeros exactly representable in bf16 and integer-valued activations the
    kernel must reproduce the dequantized matmul exactly, proving the code mapping."""
    if not int4pack.kernel_available():
        pytest.skip("torch has no CPU int4 kernel")
    g = torch.Generator().manual_seed(0)
    for qtype in (T.Q4_0, T.Q4_1):
        spec = GGML_TYPES[int(qtype)]
        b = torch.randint(0, 256, (32, 4, spec.type_size), dtype=torch.uint8, generator=g)
        d = torch.tensor([0.5, 0.25, 1.0, 2.0], dtype=torch.float16)[torch.randint(0, 4, (32, 4), generator=g)]
        b[..., 0:2] = d.view(torch.uint8).reshape(32, 4, 2)
        if qtype == T.Q4_1:
            mn = -torch.randint(0, 8, (32, 4), generator=g).to(torch.float16)
            b[..., 2:4] = mn.view(torch.uint8).reshape(32, 4, 2)
        raw = b.reshape(32, -1)
        m = GGMLQuantMethod(raw, qtype, compute_dtype=torch.bfloat16, cpp=False)
        x = torch.randint(-3, 4, (2, 128), generator=g).float()
        assert torch.equal(m.forward(x, "int4"), (x @ m.dequantize().T).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q6_K, T.F16], ids=lambda t: t.name)
def test_embedding_rows(qtype, dtype, rng):
    raw = _weight(qtype, 50, 256, rng)
    m = GGMLQuantMethod(raw, qtype, compute_dtype=dtype)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    rows = m.embedding(ids)
    assert rows.shape == (2, 3, 256) and rows.dtype == torch.float32
    full = m.dequantize()
    assert torch.equal(rows, full[ids])


def test_dense_and_raw_options(rng):
    """The torch paths' options (the C++ kernels off: with them no copy is made by default)."""
    raw = _weight(T.Q8_0, 64, 256, rng)
    exact = GGML_TYPES[int(T.Q8_0)].dequantize(raw)
    dense = GGMLQuantMethod(raw, T.Q8_0, compute_dtype=torch.bfloat16, cpp=False)
    assert dense.available_paths() == ["dequant", "dense"] and dense.choose_path(1) == "dense"
    assert dense.nbytes == raw.nbytes + 64 * 256 * 2
    assert torch.equal(dense.dequantize(), exact)
    only_dense = GGMLQuantMethod(raw, T.Q8_0, compute_dtype=torch.bfloat16, keep_raw=False)
    assert only_dense.available_paths() == ["dense"] and only_dense.nbytes == 64 * 256 * 2
    assert torch.equal(only_dense.dequantize(), exact.bfloat16().float())
    ids = torch.tensor([5, 0, 63])
    assert torch.equal(only_dense.embedding(ids), exact.bfloat16().float()[ids])
    plain = GGMLQuantMethod(raw, T.Q8_0, compute_dtype=torch.bfloat16, prepack=False, cpp=False)
    x = torch.randn(3, 256)
    assert torch.equal(plain.forward(x), dense.forward(x))
    lean = GGMLQuantMethod(raw, T.Q8_0, compute_dtype=torch.bfloat16, dense=False, cpp=False)
    assert lean.available_paths() == ["dequant"] and lean.nbytes == raw.nbytes
    f32 = GGMLQuantMethod(raw, T.Q8_0, compute_dtype=torch.float32, cpp=False)
    assert f32.available_paths() == ["dequant"] and f32.nbytes == raw.nbytes
    both = GGMLQuantMethod(raw, T.Q8_0, compute_dtype=torch.float32, dense=True, cpp=False)
    assert both.available_paths() == ["dequant", "dense"] and torch.equal(both.dequantize(), exact)
    with pytest.raises(ValueError, match="keep_raw=False"):
        GGMLQuantMethod(raw, T.Q8_0, compute_dtype=torch.float32, keep_raw=False)


def test_int4_without_raw(rng):
    if not int4pack.kernel_available():
        pytest.skip("torch has no CPU int4 kernel")
    raw = _weight(T.Q4_K, 48, 256, rng)
    m = GGMLQuantMethod(raw, T.Q4_K, keep_raw=False)
    assert m.available_paths() == ["int4"] and m.choose_path(500) == "int4"
    assert m.nbytes < raw.nbytes * 1.2
    w = m.dequantize()  # through the kernel: the bf16-rounded scale/zero values
    exact = GGML_TYPES[int(T.Q4_K)].dequantize(raw)
    assert ((w - exact).abs() <= 2.0 ** -7 * exact.abs().amax(1, keepdim=True)).all()
    x = torch.randn(2, 256)
    _check(m.forward(x), x, exact, torch.bfloat16)
    assert torch.equal(m.embedding(torch.tensor([4, 1])), w[[4, 1]])


def test_tiled_dequant_matches_untiled(rng, monkeypatch):
    from mistralrs_quant.kernels import dequant_mm
    raw = _weight(T.Q5_0, 70, 256, rng)
    m = GGMLQuantMethod(raw, T.Q5_0, compute_dtype=torch.float32)
    x = torch.randn(4, 256)
    whole = m.forward(x)
    monkeypatch.setattr(dequant_mm, "_TILE_ELEMS", 256 * 16)  # 16-row tiles, ragged tail
    assert torch.allclose(m.forward(x), whole, rtol=1e-6, atol=1e-6)


def test_input_validation(rng):
    raw = _weight(T.Q8_0, 8, 64, rng)
    with pytest.raises(ValueError, match="hold shape"):
        GGMLQuantMethod(raw, T.Q8_0, shape=(8, 32))
    with pytest.raises(ValueError, match="2-D"):
        GGMLQuantMethod(raw.reshape(-1), T.Q8_0)
    with pytest.raises(ValueError, match="not a whole number"):
        GGMLQuantMethod(raw[:, :60], T.Q8_0)
    with pytest.raises(TypeError):
        GGMLQuantMethod(raw.to(torch.int8), T.Q8_0)
    m = GGMLQuantMethod(raw, T.Q8_0, compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="features"):
        m.forward(torch.randn(2, 63))
    with pytest.raises(ValueError, match="not available"):
        m.forward(torch.randn(2, 64), "int4")
    assert "Q8_0" in repr(m)


def test_quantized_weight_protocol(rng):
    from mistralrs_core.layers.quantized import QuantMethod, QuantizedWeight
    x = rng.standard_normal((32, 64)).astype(np.float32)
    raw = quantize(torch.from_numpy(x), T.Q4_1)
    qw = GGUFQuantizedWeight(raw, T.Q4_1, (32, 64))
    assert isinstance(qw, QuantizedWeight)
    method = qw.quant_method(torch.bfloat16)
    assert isinstance(method, QuantMethod)
    assert torch.equal(method.dequantize(), qw.dequantize())
    with pytest.raises(ValueError, match="2-D"):
        GGUFQuantizedWeight(raw.reshape(-1), T.Q4_1, (2048,)).quant_method()


def test_real_weights(smollm2_path):
    from mistralrs_quant.gguf_reader import open_gguf
    f = open_gguf(smollm2_path)
    for name in ("blk.0.ffn_down.weight", "blk.0.attn_q.weight"):
        qw = GGUFQuantizedWeight.from_info(f.tensors[name])
        for dtype in (torch.float32, torch.bfloat16):
            m = qw.quant_method(dtype)
            x = torch.randn(3, m.in_features)
            for path in m.available_paths():
                _check(m.forward(x, path), x, qw.dequantize(), torch.float32 if path == "cpp" else dtype)
    emb = GGUFQuantizedWeight.from_info(f.tensors["token_embd.weight"]).quant_method(torch.bfloat16, dense=False)
    rows = emb.embedding(torch.tensor([1, 2, 49151]))
    assert rows.shape == (3, 576) and torch.isfinite(rows).all()
