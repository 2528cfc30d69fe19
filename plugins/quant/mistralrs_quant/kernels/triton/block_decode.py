"""Triton device functions that decode a tile of weights from their packed form.

Every decoder has the same shape: ``n`` [BN, 1] output rows and ``k`` [1, BK] input
columns (both already clamped into range, so no load needs a mask) -> float32 [BN, BK].
Each element is gathered from the bytes exactly as ``formats/`` lays them out, and the
arithmetic follows the torch dequantizers operation by operation (``(q * d) - m``, never
regrouped), so they reproduce them bit for bit as long as the compiler does not contract
``q * d - m`` into a fused multiply-add (the launchers in ``quant_matmul`` turn FP fusion
off; AFQ's one fused operation is an explicit ``tl.fma``, as torch's ``addcmul``).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Format ids of the kernels: ggml type ids for the block formats, and two of our own
# (written as literals inside the kernels: jitted code reads no Python globals).
AFQ = 1000
HQQ = 1001


@triton.jit
def _u8(p):
    return tl.load(p).to(tl.int32)


@triton.jit
def _i8(p):
    b = tl.load(p).to(tl.int32)
    return b - ((b >> 7) << 8)


@triton.jit
def _f16(p):
    bits = _u8(p) | (_u8(p + 1) << 8)
    return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f32(p):
    bits = _u8(p) | (_u8(p + 1) << 8) | (_u8(p + 2) << 16) | (_u8(p + 3) << 24)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nibble(qs, j, HALF: tl.constexpr):
    """Element ``j`` of a run of 2·HALF nibbles: low nibbles of HALF bytes, then high."""
    b = _u8(qs + j % HALF)
    return tl.where(j < HALF, b & 15, b >> 4)


@triton.jit
def _crumb(qs, j):
    """Element ``j`` (0..255) of the K-quants' 2-bit fields: 2 runs of 32 bytes x 4 shifts."""
    r = j % 128
    return (_u8(qs + (j // 128) * 32 + r % 32) >> ((r // 32) * 2)) & 3


@triton.jit
def _legacy(base, j, FMT: tl.constexpr):
    if FMT == 8:  # Q8_0 {f16 d, int8 q[32]}
        w = _i8(base + 2 + j).to(tl.float32) * _f16(base)
    elif FMT == 2:  # Q4_0 {f16 d, nibbles[16]}
        w = (_nibble(base + 2, j, 16) - 8).to(tl.float32) * _f16(base)
    elif FMT == 3:  # Q4_1 {f16 d, f16 m, nibbles[16]}
        w = _nibble(base + 4, j, 16).to(tl.float32) * _f16(base) + _f16(base + 2)
    elif FMT == 6:  # Q5_0 {f16 d, u32 qh, nibbles[16]}
        q = _nibble(base + 6, j, 16) | (((_u8(base + 2 + j // 8) >> (j % 8)) & 1) << 4)
        w = (q - 16).to(tl.float32) * _f16(base)
    elif FMT == 7:  # Q5_1 {f16 d, f16 m, u32 qh, nibbles[16]}
        q = _nibble(base + 8, j, 16) | (((_u8(base + 4 + j // 8) >> (j % 8)) & 1) << 4)
        w = q.to(tl.float32) * _f16(base) + _f16(base + 2)
    elif FMT == 9:  # Q8_1 {f16 d, f16 s, int8 q[32]}
        w = _i8(base + 4 + j).to(tl.float32) * _f16(base)
    else:  # MXFP4 {e8m0 e, nibbles[16]}: e2m1 values doubled, the half folded into the scale
        c = _nibble(base + 1, j, 16)
        m = c & 7
        mag = tl.where(m < 4, m, (2 + (m & 1)) << tl.maximum((m >> 1) - 1, 0))
        e = _u8(base)
        bits = tl.where(e < 2, (e * 0 + 0x00200000) << e, (e - 1) << 23)
        w = tl.where(c >= 8, -mag, mag).to(tl.float32) * bits.to(tl.float32, bitcast=True)
    return w


@triton.jit
def _k_scale_min(sc_ptr, s):
    """Sub-block ``s`` (0..7) of the 12-byte Q4_K/Q5_K field: (6-bit scale, 6-bit min)."""
    i = s % 4
    lo = s < 4
    b0 = _u8(sc_ptr + i)
    b4 = _u8(sc_ptr + 4 + i)
    b8 = _u8(sc_ptr + 8 + i)
    sc = tl.where(lo, b0 & 63, (b8 & 15) | ((b0 >> 6) << 4))
    mn = tl.where(lo, b4 & 63, (b8 >> 4) | ((b4 >> 6) << 4))
    return sc, mn


@triton.jit
def _kquant(base, j, FMT: tl.constexpr):
    if FMT == 12:  # Q4_K {f16 d, f16 dmin, scales[12], nibbles[128]}
        s = j // 32
        sc, mn = _k_scale_min(base + 4, s)
        b = _u8(base + 16 + (s // 2) * 32 + j % 32)
        q = tl.where(s % 2 == 0, b & 15, b >> 4)
        w = q.to(tl.float32) * (_f16(base) * sc.to(tl.float32)) - _f16(base + 2) * mn.to(tl.float32)
    elif FMT == 13:  # Q5_K {f16 d, f16 dmin, scales[12], qh[32], nibbles[128]}
        s = j // 32
        sc, mn = _k_scale_min(base + 4, s)
        b = _u8(base + 48 + (s // 2) * 32 + j % 32)
        q = tl.where(s % 2 == 0, b & 15, b >> 4) | (((_u8(base + 16 + j % 32) >> s) & 1) << 4)
        w = q.to(tl.float32) * (_f16(base) * sc.to(tl.float32)) - _f16(base + 2) * mn.to(tl.float32)
    elif FMT == 14:  # Q6_K {ql[128], qh[64], int8 scales[16], f16 d}
        r = j % 128
        lo = _nibble(base + (j // 128) * 64, r, 64)
        q = (lo | (_crumb(base + 128, j) << 4)) - 32
        w = q.to(tl.float32) * (_f16(base + 208) * _i8(base + 192 + j // 16).to(tl.float32))
    elif FMT == 10:  # Q2_K {scales[16], q[64], f16 d, f16 dmin}
        sc = _u8(base + j // 16)
        dl = _f16(base + 80) * (sc & 15).to(tl.float32)
        ml = _f16(base + 82) * (sc >> 4).to(tl.float32)
        w = _crumb(base + 16, j).to(tl.float32) * dl - ml
    elif FMT == 11:  # Q3_K {hmask[32], q[64], scales[12], f16 d}
        i = j // 16
        low = _u8(base + 96 + i % 8)
        low = tl.where(i < 8, low & 15, low >> 4)
        high = (_u8(base + 104 + i % 4) >> (2 * (i // 4))) & 3
        sc = (low | (high << 4)) - 32
        hbit = (_u8(base + j % 32) >> (j // 32)) & 1
        q = _crumb(base + 32, j) - ((hbit ^ 1) << 2)
        w = q.to(tl.float32) * (_f16(base + 108) * sc.to(tl.float32))
    else:  # Q8_K {f32 d, int8 q[256], i16 bsums[16]}
        w = _i8(base + 4 + j).to(tl.float32) * _f32(base)
    return w


@triton.jit
def ggml_tile(w_ptr, n, k, ROW_BYTES, FMT: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr):
    """float32 [BN, BK] of a ggml weight stored as uint8 [N, ROW_BYTES] (QK elements in
    TS bytes per block)."""
    base = w_ptr + n * ROW_BYTES + (k // QK) * TS
    if QK == 32:
        w = _legacy(base, k % QK, FMT)
    else:
        w = _kquant(base, k % QK, FMT)
    return w


@triton.jit
def afq_tile(w_ptr, s_ptr, b_ptr, n, k, WORDS, GROUPS, BITS: tl.constexpr, GROUP: tl.constexpr):
    """MLX affine groups: codes as a little-endian bit stream of int32 words [N, WORDS],
    scales/biases [N, GROUPS]; ``bias + q * scale``."""
    pos = k * BITS
    word = pos // 32
    off = pos % 32
    row = w_ptr + n * WORDS
    lo = tl.load(row + word).to(tl.int64) & 0xFFFFFFFF
    if BITS == 3 or BITS == 6:
        # 3- and 6-bit codes can straddle two words.
        hi = tl.load(row + tl.minimum(word + 1, WORDS - 1)).to(tl.int64) & 0xFFFFFFFF
        lo = lo | (hi << 32)
    q = ((lo >> off) & ((1 << BITS) - 1)).to(tl.float32)
    g = n * GROUPS + k // GROUP
    # One rounding, as torch's addcmul (``formats.afq``) computes it on CPU.
    return tl.fma(q, tl.load(s_ptr + g).to(tl.float32), tl.load(b_ptr + g).to(tl.float32))


@triton.jit
def hqq_tile(w_ptr, s_ptr, z_ptr, n, k, K, COLS, BITS: tl.constexpr, GROUP: tl.constexpr):
    """HQQ (axis 0): the weight flattened and viewed as [GROUP, COLS], one group per column;
    4-bit codes packed down the group axis (row r high nibble, row r + GROUP/2 low)."""
    f = n * K + k
    r = f // COLS
    c = f % COLS
    if BITS == 8:
        q = tl.load(w_ptr + r * COLS + c).to(tl.int32)
    else:
        HALF: tl.constexpr = GROUP // 2
        b = tl.load(w_ptr + (r % HALF) * COLS + c).to(tl.int32)
        q = tl.where(r < HALF, b >> 4, b & 15)
    return (q.to(tl.float32) - tl.load(z_ptr + c)) * tl.load(s_ptr + c)


@triton.jit
def weight_tile(w_ptr, a_ptr, b_ptr, n, k, K, ROW, AUX, FMT: tl.constexpr, BITS: tl.constexpr,
                GROUP: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr):
    """One entry point for the matmul kernels: ``ROW``/``AUX`` are the format's row stride
    (bytes or words) and its auxiliary stride (AFQ groups per row, HQQ columns)."""
    if FMT == 1000:  # AFQ
        w = afq_tile(w_ptr, a_ptr, b_ptr, n, k, ROW, AUX, BITS, GROUP)
    elif FMT == 1001:  # HQQ
        w = hqq_tile(w_ptr, a_ptr, b_ptr, n, k, K, AUX, BITS, GROUP)
    else:
        w = ggml_tile(w_ptr, n, k, ROW, FMT, QK, TS)
    return w
