"""Test helpers: random ggml blocks with controlled scale fields, and reference dequantizers."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

# Where each format keeps its scale-like fields: (byte offset, kind).
SCALE_FIELDS = {
    T.Q4_0: [(0, "f16")], T.Q4_1: [(0, "f16"), (2, "f16")],
    T.Q5_0: [(0, "f16")], T.Q5_1: [(0, "f16"), (2, "f16")],
    T.Q8_0: [(0, "f16")], T.Q8_1: [(0, "f16"), (2, "f16")],
    T.Q2_K: [(80, "f16"), (82, "f16")], T.Q3_K: [(108, "f16")],
    T.Q4_K: [(0, "f16"), (2, "f16")], T.Q5_K: [(0, "f16"), (2, "f16")],
    T.Q6_K: [(208, "f16")], T.Q8_K: [(0, "f32")], T.MXFP4: [(0, "e8m0")],
}

BLOCK_TYPES = list(SCALE_FIELDS)
FLOAT_TYPES = [T.F32, T.F16, T.BF16]


def random_raw(qtype, rows: int, blocks_per_row: int, rng: np.random.Generator,
               scale: float = 0.05) -> np.ndarray:
    """uint8 [rows, bytes] with random quants and finite, moderate scales."""
    from mistralrs_quant.formats import GGML_TYPES
    spec = GGML_TYPES[int(qtype)]
    if qtype in FLOAT_TYPES:
        vals = rng.standard_normal((rows, blocks_per_row)).astype(np.float32)
        dt = {T.F32: np.float32, T.F16: np.float16}.get(qtype)
        if dt is not None:
            return vals.astype(dt).view(np.uint8).reshape(rows, -1)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, spec.type_size), dtype=np.uint8)
    n = rows * blocks_per_row
    for off, kind in SCALE_FIELDS[qtype]:
        if kind == "f16":
            v = (rng.standard_normal(n) * scale).astype(np.float16)
            raw[..., off:off + 2] = v.view(np.uint8).reshape(rows, blocks_per_row, 2)
        elif kind == "f32":
            v = (rng.standard_normal(n) * scale).astype(np.float32)
            raw[..., off:off + 4] = v.view(np.uint8).reshape(rows, blocks_per_row, 4)
        else:
            raw[..., off] = rng.integers(100, 140, size=(rows, blocks_per_row), dtype=np.uint8)
    return raw.reshape(rows, -1)


def set_scale(raw: np.ndarray, qtype, field: int, bits: int) -> np.ndarray:
    """Overwrite scale field ``field`` of every block with the raw bit pattern ``bits``."""
    from mistralrs_quant.formats import GGML_TYPES
    spec = GGML_TYPES[int(qtype)]
    off, kind = SCALE_FIELDS[qtype][field]
    b = raw.reshape(-1, spec.type_size)
    width = {"f16": 2, "f32": 4, "e8m0": 1}[kind]
    b[:, off:off + width] = np.frombuffer(int(bits).to_bytes(width, "little"), dtype=np.uint8)
    return raw


def ref_dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """gguf-py's numpy dequantizer, or (Q8_1, Q8_K, which it lacks) ggml's definition."""
    import gguf
    with np.errstate(all="ignore"):
        return _ref(raw, qtype, gguf)


def _ref(raw, qtype, gguf):
    if qtype == T.Q8_1:  # {f16 d, f16 s, int8 qs[32]}: value = d * q
        b = raw.reshape(-1, 36)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        q = b[:, 4:].copy().view(np.int8).astype(np.float32)
        return (q * d).reshape(*raw.shape[:-1], -1)
    if qtype == T.Q8_K:  # {f32 d, int8 qs[256], int16 bsums[16]}: value = d * q
        b = raw.reshape(-1, 292)
        d = b[:, 0:4].copy().view(np.float32)
        q = b[:, 4:260].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(*raw.shape[:-1], -1)
    return gguf.quants.dequantize(raw, qtype)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical, except that NaNs only need to be NaN in the same places (their
    payload depends on which operation produced them)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if a.shape != b.shape:
        return False
    na, nb = np.isnan(a), np.isnan(b)
    return bool(np.array_equal(na, nb) and np.array_equal(a.view(np.uint32)[~na], b.view(np.uint32)[~nb]))
