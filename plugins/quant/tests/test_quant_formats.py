"""Every block format against the reference dequantizer, and the quantizers."""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from mistralrs_quant.formats import GGML_TYPES, dequantize, get_format, quantize, type_name
from quant_blocks import BLOCK_TYPES, FLOAT_TYPES, random_raw, ref_dequantize, same_bits, set_scale

ALL = FLOAT_TYPES + BLOCK_TYPES


def test_registry_covers_the_required_types():
    want = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q8_1, T.Q2_K, T.Q3_K,
            T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K, T.MXFP4}
    assert {T(t) for t in GGML_TYPES} == want
    for t, spec in GGML_TYPES.items():
        assert spec.ggml_type == t and spec.name == T(t).name
        if t != T.Q8_1:  # gguf-py still lists the old 40-byte Q8_1 layout
            assert (spec.block_size, spec.type_size) == gguf.GGML_QUANT_SIZES[T(t)]
    assert (GGML_TYPES[T.Q8_1].block_size, GGML_TYPES[T.Q8_1].type_size) == (32, 36)


def test_type_names_for_errors():
    # Served types are named from our own table, the rest (in error messages) by gguf-py.
    for t in T:
        assert type_name(int(t)) == t.name
    assert type_name(9999) == "unknown type 9999"


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_random_bytes_bit_exact(qtype, rng):
    spec = GGML_TYPES[int(qtype)]
    # Unconstrained bytes: scales include inf/NaN/subnormal patterns too.
    raw = rng.integers(0, 256, size=(7, 3 * spec.type_size), dtype=np.uint8)
    out = dequantize(torch.from_numpy(raw), qtype)
    assert out.dtype == torch.float32 and out.shape == (7, 3 * spec.block_size)
    assert same_bits(out.numpy(), ref_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_realistic_blocks_and_multi_dim(qtype, rng):
    raw = random_raw(qtype, 2 * 3 * 5, 4, rng).reshape(2, 3, 5, -1)
    out = dequantize(torch.from_numpy(raw), qtype)
    ref = ref_dequantize(raw.reshape(30, -1), qtype).reshape(2, 3, 5, -1)
    assert np.isfinite(ref).all()
    assert same_bits(out.numpy(), ref)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_all_zero_blocks(qtype):
    spec = GGML_TYPES[int(qtype)]
    raw = np.zeros((3, 2 * spec.type_size), dtype=np.uint8)
    out = dequantize(torch.from_numpy(raw), qtype).numpy()
    assert same_bits(out, ref_dequantize(raw, qtype))
    if qtype != T.MXFP4:  # e8m0 exponent 0 is 2^-127, still multiplied by zero codes
        assert not out.any()


# f16: max, -max, smallest subnormal, smallest normal, -0, +inf, NaN
F16_EDGES = [0x7BFF, 0xFBFF, 0x0001, 0x0400, 0x8000, 0x7C00, 0x7E00]


@pytest.mark.parametrize("qtype", [t for t in BLOCK_TYPES if t not in (T.Q8_K, T.MXFP4)],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("bits", F16_EDGES, ids=hex)
def test_extreme_f16_scales(qtype, bits, rng):
    from quant_blocks import SCALE_FIELDS
    for field in range(len(SCALE_FIELDS[qtype])):
        raw = random_raw(qtype, 5, 2, rng)
        set_scale(raw, qtype, field, bits)
        out = dequantize(torch.from_numpy(raw), qtype).numpy()
        assert same_bits(out, ref_dequantize(raw, qtype))


@pytest.mark.parametrize("bits", [0x00000001, 0x7F7FFFFF, 0xFF7FFFFF, 0x80000000, 0x7F800000])
def test_q8_k_extreme_f32_scale(bits, rng):
    raw = random_raw(T.Q8_K, 3, 2, rng)
    set_scale(raw, T.Q8_K, 0, bits)
    assert same_bits(dequantize(torch.from_numpy(raw), T.Q8_K).numpy(), ref_dequantize(raw, T.Q8_K))


@pytest.mark.parametrize("e", [0, 1, 2, 127, 200, 254, 255])
def test_mxfp4_exponents(e, rng):
    raw = random_raw(T.MXFP4, 3, 4, rng)
    set_scale(raw, T.MXFP4, 0, e)
    assert same_bits(dequantize(torch.from_numpy(raw), T.MXFP4).numpy(), ref_dequantize(raw, T.MXFP4))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_1, T.Q2_K, T.Q4_K, T.Q5_K], ids=lambda t: t.name)
def test_negative_mins(qtype, rng):
    raw = random_raw(qtype, 4, 3, rng)
    set_scale(raw, qtype, 1, int(np.float16(-1.5).view(np.uint16)))
    out = dequantize(torch.from_numpy(raw), qtype).numpy()
    assert same_bits(out, ref_dequantize(raw, qtype))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple"):
        dequantize(torch.zeros(2, 35, dtype=torch.uint8), T.Q8_0)
    with pytest.raises(TypeError):
        dequantize(torch.zeros(2, 34, dtype=torch.int8), T.Q8_0)
    with pytest.raises(ValueError, match="IQ2_XS"):
        get_format(T.IQ2_XS)
    with pytest.raises(ValueError, match="multiple"):
        quantize(torch.zeros(3, 40), T.Q4_0)


# ---------------------------------------------------------------- quantizers

def _quant_inputs(rng):
    x = (rng.standard_normal((24, 256)) * rng.uniform(1e-3, 50, (24, 1))).astype(np.float32)
    x[0] = 0                                     # all-zero blocks
    x[1, :32] = 5.0                              # constant positive block
    x[2, :32] = -3.0                             # constant negative block
    x[3] = 0.49999997                            # rounding edge of roundf
    x[4, :64] = 1e-8                             # scales underflow f16
    x[5, :32] = 70000.0                          # scale overflows f16
    x[6, :32] = np.arange(32) - 15.5             # exact .5 ties
    x[7, 5] = -np.abs(x[7, :32]).max()           # +max and -max tie in magnitude
    x[7, 6] = -x[7, 5]
    x[8] = rng.uniform(-1, 1, 256).astype(np.float32) * np.float32(2.0 ** -20)  # subnormal-ish f16
    return x


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1],
                         ids=lambda t: t.name)
def test_quantize_bit_exact_against_gguf(qtype, rng):
    x = _quant_inputs(rng)
    with np.errstate(all="ignore"):
        ref = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(x.shape[0], -1)
    out = quantize(torch.from_numpy(x), qtype)
    assert out.dtype == torch.uint8
    np.testing.assert_array_equal(out.numpy(), ref)


def test_bf16_quantize_nan_and_inf():
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 1.0, 3.0e38], dtype=np.float32)
    x = np.concatenate([x, np.frombuffer(np.uint32(0x7F800001).tobytes(), np.float32)])
    np.testing.assert_array_equal(quantize(torch.from_numpy(x), T.BF16).numpy(),
                                  gguf.quants.quantize(x, T.BF16).view(np.uint8))


def _rel_rmse(y, x):
    return np.sqrt(((y - x) ** 2).mean(-1)) / (np.sqrt((x ** 2).mean(-1)) + 1e-30)


# Relative RMS error on Gaussian rows; Q4_0 (gguf's reference) scores about 0.087.
ROUND_TRIP = {T.Q8_0: 0.007, T.Q8_1: 0.007, T.Q8_K: 0.01, T.Q6_K: 0.025, T.Q5_0: 0.05,
              T.Q5_1: 0.05, T.Q4_K: 0.085, T.Q4_0: 0.1, T.Q4_1: 0.09}


@pytest.mark.parametrize("qtype", list(ROUND_TRIP), ids=lambda t: t.name)
def test_round_trip(qtype, rng):
    x = rng.standard_normal((16, 512)).astype(np.float32)
    q = quantize(torch.from_numpy(x), qtype)
    assert q.shape == (16, GGML_TYPES[int(qtype)].row_bytes(512))
    y = dequantize(q, qtype).numpy()
    assert np.median(_rel_rmse(y, x)) < ROUND_TRIP[qtype]
    assert _rel_rmse(y, x).max() < 1.3 * ROUND_TRIP[qtype]


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_K], ids=lambda t: t.name)
def test_kquant_quantizers_on_edge_rows(qtype, rng):
    x = np.zeros((6, 256), dtype=np.float32)
    x[1, :32] = 5.0                   # constant blocks of either sign, rest of the row zero
    x[2, :32] = -3.0
    x[3] = 0.49999997
    x[4] = rng.standard_normal(256) * 1e3
    x[5] = rng.standard_normal(256) * 1e-3
    y = dequantize(quantize(torch.from_numpy(x), qtype), qtype).numpy()
    assert not y[0].any()
    np.testing.assert_allclose(y[1:4], x[1:4], rtol=2e-3, atol=0)
    assert _rel_rmse(y[4:], x[4:]).max() < 1.3 * ROUND_TRIP[qtype]


def test_q8_k_bsums_are_block_sums(rng):
    x = rng.standard_normal((2, 512)).astype(np.float32)
    b = quantize(torch.from_numpy(x), T.Q8_K).numpy().reshape(-1, 292)
    q = b[:, 4:260].view(np.int8).astype(np.int32).reshape(-1, 16, 16).sum(-1)
    np.testing.assert_array_equal(b[:, 260:].copy().view(np.int16), q)
