// AVX-512 kernels for ggml block formats (float32-exact variant).
//
// Every block is decoded in registers to the float32 values the reference dequantizer
// produces, then multiplied into float32 accumulators. The decoded value is bit-identical
// to ggml's: each format's scale times code is exact in float32 (an f16 significand times
// a code of at most 14 bits), so folding "- offset" / "+ min" into one FMA rounds once,
// exactly where the reference rounds. The only difference from `x @ dequantize(W).T` is
// therefore the summation order.
//
// Compiled with a target pragma (not -mavx512f on the command line): nothing in this file
// may be shared with the portable translation unit, so only intrinsics and file-local
// functions appear below the pragma.
#include <cstdint>
#include <cstring>

#include "ggml_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#endif

#include <immintrin.h>

// Software prefetch distance in bytes. A row-at-a-time walk is a single sequential
// stream, which the hardware prefetcher alone serves at about half the DRAM bandwidth;
// asking ~4 KB ahead (several rows of a small matrix) doubled the large-matrix rate.
#ifndef MQ_PF_DIST
#define MQ_PF_DIST 4096
#endif

namespace mq {
namespace {

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_table[h];
}

inline __m512i u8x16(const uint8_t* p) {  // 16 bytes zero-extended to 16 int32 lanes
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline __m512 to_f(__m512i v) { return _mm512_cvtepi32_ps(v); }

// A format is a struct with
//   BS, TS   elements and bytes per block
//   G        elements decoded per group() call (a multiple of 16)
//   S        per-block state (scales) built once by prep()
//   group()  writes the float values of elements [j*G, j*G+G) of the block to w[G/16]
// Groups smaller than a 256-block keep the decoded values within the register file while
// several activation rows reuse them.

// 4- and 5-bit codes index a per-block table of their 16 (32) float values, built with
// one FMA per 16 entries: a permute then replaces the int->float conversion and the
// scale/offset arithmetic of every element. vpermps reads only the low 4 index bits, so
// the low nibble needs no masking.
inline __m512 iota16() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline __m512 iota16_hi() {
  return _mm512_setr_ps(16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
}

// Scales enter as memory broadcasts (see f16_table) and the offset is folded into the
// constant (q - 8): (q - 8) d is exact, so this is the reference value.
struct FQ4_0 {
  static constexpr int BS = 32, TS = 18, G = 32;
  struct S { __m512 t; };
  static S prep(const uint8_t* b) {
    const __m512 q = _mm512_sub_ps(iota16(), _mm512_set1_ps(8.0f));
    return {_mm512_mul_ps(q, _mm512_set1_ps(f16_at(b)))};
  }
  static void group(const S& s, const uint8_t* b, int, __m512* w) {
    __m512i v = u8x16(b + 2);
    w[0] = _mm512_permutexvar_ps(v, s.t);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), s.t);
  }
};

struct FQ4_1 {
  static constexpr int BS = 32, TS = 20, G = 32;
  struct S { __m512 t; };
  static S prep(const uint8_t* b) {
    return {_mm512_fmadd_ps(iota16(), _mm512_set1_ps(f16_at(b)), _mm512_set1_ps(f16_at(b + 2)))};
  }
  static void group(const S& s, const uint8_t* b, int, __m512* w) {
    __m512i v = u8x16(b + 4);
    w[0] = _mm512_permutexvar_ps(v, s.t);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), s.t);
  }
};

inline uint16_t u16_at(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline uint32_t u32_at(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Q5_1 (and Q5_K): q d + m rounds once in the reference, so the 5-bit code indexes a
// 32-entry table (two registers, vpermt2ps) instead of correcting a 16-entry one.
inline __m512i with_bit4(__m512i nib, __mmask16 bit) {
  return _mm512_mask_or_epi32(nib, bit, nib, _mm512_set1_epi32(16));
}

// Q5_0: (q - 16) d from a 32-entry table. (Correcting a 16-entry table by + 16 d would
// be as exact but give +0 where the reference's (q - 16) * d is -0 for a negative d.)
struct FQ5_0 {
  static constexpr int BS = 32, TS = 22, G = 32;
  struct S { __m512 t0, t1; __mmask16 hl, hh; };
  static S prep(const uint8_t* b) {
    const __m512 d = _mm512_set1_ps(f16_at(b));
    return {_mm512_mul_ps(_mm512_sub_ps(iota16(), _mm512_set1_ps(16.0f)), d), _mm512_mul_ps(iota16(), d),
            u16_at(b + 2), u16_at(b + 4)};
  }
  // The fifth bit as in FQ5_1 (below).
  static void group(const S& s, const uint8_t* b, int, __m512* w) {
    const __m512i v = u8x16(b + 6), hi = _mm512_srli_epi32(v, 4);
    w[0] = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(v, s.t0), s.hl, v, s.t1);
    w[1] = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(hi, s.t0), s.hh, hi, s.t1);
  }
};

// The fifth bit picks between the two 16-entry halves of the table by a masked second
// lookup (vpermps reads only the low 4 index bits, so the nibbles need no masking), the
// masks loaded straight from the block: two uops fewer per 32 codes than assembling
// 5-bit indices for vpermt2ps.
struct FQ5_1 {
  static constexpr int BS = 32, TS = 24, G = 32;
  struct S { __m512 t0, t1; __mmask16 hl, hh; };
  static S prep(const uint8_t* b) {
    const __m512 d = _mm512_set1_ps(f16_at(b)), m = _mm512_set1_ps(f16_at(b + 2));
    return {_mm512_fmadd_ps(iota16(), d, m), _mm512_fmadd_ps(iota16_hi(), d, m),
            u16_at(b + 4), u16_at(b + 6)};
  }
  static void group(const S& s, const uint8_t* b, int, __m512* w) {
    const __m512i v = u8x16(b + 8), hi = _mm512_srli_epi32(v, 4);
    w[0] = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(v, s.t0), s.hl, v, s.t1);
    w[1] = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(hi, s.t0), s.hh, hi, s.t1);
  }
};

struct FQ8_0 {
  static constexpr int BS = 32, TS = 34, G = 32;
  struct S { __m512 d; };
  static S prep(const uint8_t* b) { return {_mm512_set1_ps(f16_at(b))}; }
  static void group(const S& s, const uint8_t* b, int, __m512* w) {
    const __m128i* q = reinterpret_cast<const __m128i*>(b + 2);
    w[0] = _mm512_mul_ps(to_f(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), s.d);
    w[1] = _mm512_mul_ps(to_f(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), s.d);
  }
};

// Q4_K/Q5_K: eight 6-bit (scale, min) pairs packed in 12 bytes; sub-block j's value is
// (d * sc[j]) * q - (dmin * mn[j]). Unpacked as one vector, lanes [sc0..7, mn0..7]: done
// one scalar at a time it cost more than the 256 multiply-adds it serves. Writes
// out[j] = d * sc[j] and out[8 + j] = -(dmin * mn[j]), exact products as in the reference.
inline void k_scales(const uint8_t* b, float* out) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));  // 12 used
  // sc0..3 = q0..3 & 63, sc4..7 = q8..11 & 15 | (q0..3 >> 6) << 4,
  // mn0..3 = q4..7 & 63, mn4..7 = q8..11 >> 4 | (q4..7 >> 6) << 4.
  const __m512i lo = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(q, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11)));
  const __m512i hi = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(q, _mm_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7)));
  const __m512i shift = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4);
  const __m512i mlo = _mm512_setr_epi32(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15);
  const __m512i mhi = _mm512_setr_epi32(0, 0, 0, 0, 48, 48, 48, 48, 0, 0, 0, 0, 48, 48, 48, 48);
  const __m512i v = _mm512_or_si512(_mm512_and_si512(_mm512_srlv_epi32(lo, shift), mlo),
                                    _mm512_and_si512(_mm512_srli_epi32(hi, 2), mhi));
  const __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(f16_at(b)), _mm512_set1_ps(-f16_at(b + 2)));
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(v), scale));
  // Kept in memory: the group decoders broadcast single scales from it, a load-port uop
  // each. Left to itself GCC keeps the vector in a register and broadcasts lanes with
  // vpermd from spilled index vectors, shuffle-port uops that the 4-bit decode is bound by
  // (Q4_K ~25% slower at four rows in flight).
  asm volatile("" : : "r"(out) : "memory");
}

struct FQ4_K {
  static constexpr int BS = 256, TS = 144, G = 64;
  struct S { float dm[16]; };  // d * sc[j] at j, -(dmin * mn[j]) at 8 + j
  static S prep(const uint8_t* b) {
    S s;
    k_scales(b, s.dm);
    return s;
  }
  // Group j: 32 bytes whose low nibbles are sub-block 2j and high nibbles sub-block 2j+1.
  static void group(const S& s, const uint8_t* b, int j, __m512* w) {
    const uint8_t* qs = b + 16 + 32 * j;
    __m512i v0 = u8x16(qs), v1 = u8x16(qs + 16);
    __m512 ta = _mm512_fmadd_ps(iota16(), _mm512_set1_ps(s.dm[2 * j]), _mm512_set1_ps(s.dm[8 + 2 * j]));
    __m512 tb = _mm512_fmadd_ps(iota16(), _mm512_set1_ps(s.dm[2 * j + 1]), _mm512_set1_ps(s.dm[9 + 2 * j]));
    w[0] = _mm512_permutexvar_ps(v0, ta);
    w[1] = _mm512_permutexvar_ps(v1, ta);
    w[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), tb);
    w[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), tb);
  }
};

struct FQ5_K {
  static constexpr int BS = 256, TS = 176, G = 64;
  struct S { float dm[16]; __m256i qh; };
  static S prep(const uint8_t* b) {
    S s;
    k_scales(b, s.dm);
    s.qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    return s;
  }
  // As Q4_K, plus a fifth bit: bit 2j (low half) / 2j+1 (high half) of qh[l].
  static void group(const S& s, const uint8_t* b, int j, __m512* w) {
    const uint8_t* qs = b + 48 + 32 * j;
    __m512i v0 = u8x16(qs), v1 = u8x16(qs + 16), m15 = _mm512_set1_epi32(15);
    __mmask32 hl = _mm256_test_epi8_mask(s.qh, _mm256_set1_epi8(static_cast<char>(1 << (2 * j))));
    __mmask32 hh = _mm256_test_epi8_mask(s.qh, _mm256_set1_epi8(static_cast<char>(2 << (2 * j))));
    __m512i a0 = with_bit4(_mm512_and_si512(v0, m15), static_cast<__mmask16>(hl));
    __m512i a1 = with_bit4(_mm512_and_si512(v1, m15), static_cast<__mmask16>(hl >> 16));
    __m512i c0 = with_bit4(_mm512_srli_epi32(v0, 4), static_cast<__mmask16>(hh));
    __m512i c1 = with_bit4(_mm512_srli_epi32(v1, 4), static_cast<__mmask16>(hh >> 16));
    const __m512 da = _mm512_set1_ps(s.dm[2 * j]), ma = _mm512_set1_ps(s.dm[8 + 2 * j]);
    const __m512 db = _mm512_set1_ps(s.dm[2 * j + 1]), mb = _mm512_set1_ps(s.dm[9 + 2 * j]);
    const __m512 ta0 = _mm512_fmadd_ps(iota16(), da, ma), ta1 = _mm512_fmadd_ps(iota16_hi(), da, ma);
    const __m512 tb0 = _mm512_fmadd_ps(iota16(), db, mb), tb1 = _mm512_fmadd_ps(iota16_hi(), db, mb);
    w[0] = _mm512_permutex2var_ps(ta0, a0, ta1);
    w[1] = _mm512_permutex2var_ps(ta0, a1, ta1);
    w[2] = _mm512_permutex2var_ps(tb0, c0, tb1);
    w[3] = _mm512_permutex2var_ps(tb0, c1, tb1);
  }
};

// Q6_K: 128-element halves; in half h, element l < 32 of quarter t takes its low 4 bits
// from ql[64h + l + 32(t&1)] (low nibble for t < 2, high for t ≥ 2) and its top 2 bits from
// qh[32h + l] >> 2t; one int8 scale per 16 elements. A group is a whole half, so each
// byte is loaded once.
struct FQ6_K {
  static constexpr int BS = 256, TS = 210, G = 128;
  struct S { float d[16]; };
  static S prep(const uint8_t* b) {
    S s;
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192))));
    _mm512_storeu_ps(s.d, _mm512_mul_ps(_mm512_set1_ps(f16_at(b + 208)), sc));
    return s;
  }
  // The 6-bit codes of a half are assembled 64 at a time in bytes (16-bit shifts are
  // safe: the 0x30 mask keeps only bits that came from the same byte), then widened 16 at
  // a time from a stack copy, where a widening load costs one shuffle uop instead of two.
  static void group(const S& s, const uint8_t* b, int h, __m512* w) {
    const __m512i L = _mm512_loadu_si512(b + 64 * h);
    const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)));
    const __m512i m0f = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    // Lanes 0..31 hold codes l, lanes 32..63 codes 32 + l (q12); then 64 + l, 96 + l (q34).
    const __m512i up = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i dn = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    // q - 32 in bytes, then (d sc) * (q - 32) as the reference (an FMA with -32 d sc would
    // be as exact but turn its -0 into +0).
    const __m512i m32 = _mm512_set1_epi8(32);
    alignas(64) int8_t q[128];
    _mm512_store_si512(q, _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(L, m0f),
                                                          _mm512_and_si512(_mm512_sllv_epi16(H, up), m30)), m32));
    _mm512_store_si512(q + 64, _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m0f),
                                                               _mm512_and_si512(_mm512_srlv_epi16(H, dn), m30)), m32));
    const float* sd = s.d + 8 * h;
    for (int g = 0; g < 8; ++g)
      w[g] = _mm512_mul_ps(to_f(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(q + 16 * g)))),
                           _mm512_set1_ps(sd[g]));
  }
};

// Dense rows as 16-element blocks (the decoder step's unquantized weights).
struct FF32 {
  static constexpr int BS = 16, TS = 64, G = 16;
  struct S {};
  static S prep(const uint8_t*) { return {}; }
  static void group(const S&, const uint8_t* b, int, __m512* w) { w[0] = _mm512_loadu_ps(b); }
};

struct FF16 {
  static constexpr int BS = 16, TS = 32, G = 16;
  struct S {};
  static S prep(const uint8_t*) { return {}; }
  static void group(const S&, const uint8_t* b, int, __m512* w) {
    w[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  }
};

struct FBF16 {
  static constexpr int BS = 16, TS = 32, G = 16;
  struct S {};
  static S prep(const uint8_t*) { return {}; }
  static void group(const S&, const uint8_t* b, int, __m512* w) {
    const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
    w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  }
};

// One weight row against MR activation rows. With few rows the FMA latency (4 cycles),
// not throughput, would bound a single accumulator chain, so each of the G/16 vectors of
// a group gets its own chain when MR < 4.
template <class F, int MR>
inline void dot_row(const float* x, int64_t ldx, const uint8_t* row, int64_t nb, float* y, int64_t ldy) {
  constexpr int NW = F::G / 16;
  constexpr int NA = MR >= 4 ? 1 : NW;
  // The unroll pragmas let GCC turn acc into registers early: unrolled only later (plain
  // -O3), it kept them in registers but also stored every accumulator to the stack on every
  // block (8 dead 64-byte stores per 16 FMAs at MR = 8). Without them: M = 2 ~40% and M = 8
  // ~10-18% slower for Q4_0/Q5_0/Q8_0/Q6_K; results are the same bits either way.
  __m512 acc[MR][NA];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
  for (int64_t ib = 0; ib < nb; ++ib) {
    const uint8_t* blk = row + ib * F::TS;
#if MQ_PF_DIST > 0
    _mm_prefetch(reinterpret_cast<const char*>(blk + MQ_PF_DIST), _MM_HINT_T0);
    if (F::TS > 64) _mm_prefetch(reinterpret_cast<const char*>(blk + MQ_PF_DIST + 64), _MM_HINT_T0);
    if (F::TS > 128) _mm_prefetch(reinterpret_cast<const char*>(blk + MQ_PF_DIST + 128), _MM_HINT_T0);
    if (F::TS > 192) _mm_prefetch(reinterpret_cast<const char*>(blk + MQ_PF_DIST + 192), _MM_HINT_T0);
#endif
    const typename F::S s = F::prep(blk);
    const float* xb = x + ib * F::BS;
    for (int j = 0; j < F::BS / F::G; ++j) {
      __m512 w[NW];
      F::group(s, blk, j, w);
#pragma GCC unroll 16
      for (int c = 0; c < NW; ++c)
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m)
          acc[m][c % NA] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + m * ldx + j * F::G + c * 16), w[c], acc[m][c % NA]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    __m512 t = acc[m][0];
#pragma GCC unroll 16
    for (int a = 1; a < NA; ++a) t = _mm512_add_ps(t, acc[m][a]);
    y[m * ldy] = _mm512_reduce_add_ps(t);
  }
}

// One activation row (a decode step) against NR consecutive weight rows at once. A single
// row's accumulator chains get one FMA per block each, so a row of few blocks (K = 576:
// 18 of Q4_1) waits on FMA latency and then on its horizontal sum; NR independent rows
// keep the FMA ports busy and share each activation load. Each row's arithmetic is
// dot_row<F, 1>'s, in the same order (same chains, same final sum), so outputs are
// bit-identical to it.
template <class F, int NR>
inline void dot_rows_m1(const float* x, const uint8_t* row0, int64_t stride, int64_t nb, float* y) {
  constexpr int NW = F::G / 16;
  __m512 acc[NR][NW];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NW; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t ib = 0; ib < nb; ++ib) {
    const uint8_t* blk0 = row0 + ib * F::TS;
#if MQ_PF_DIST > 0
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const char* p = reinterpret_cast<const char*>(blk0 + r * stride + MQ_PF_DIST);
      _mm_prefetch(p, _MM_HINT_T0);
      if (F::TS > 64) _mm_prefetch(p + 64, _MM_HINT_T0);
      if (F::TS > 128) _mm_prefetch(p + 128, _MM_HINT_T0);
      if (F::TS > 192) _mm_prefetch(p + 192, _MM_HINT_T0);
    }
#endif
    typename F::S s[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) s[r] = F::prep(blk0 + r * stride);
    const float* xb = x + ib * F::BS;
#pragma GCC unroll 16
    for (int j = 0; j < F::BS / F::G; ++j) {
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        __m512 w[NW];
        F::group(s[r], blk0 + r * stride, j, w);
#pragma GCC unroll 16
        for (int c = 0; c < NW; ++c)
          acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + j * F::G + c * 16), w[c], acc[r][c]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    __m512 t = acc[r][0];
#pragma GCC unroll 16
    for (int c = 1; c < NW; ++c) t = _mm512_add_ps(t, acc[r][c]);
    y[r] = _mm512_reduce_add_ps(t);
  }
}

// Rows in flight for dot_rows_m1: as many as keep the accumulators (NR x G/16) and the
// decoded group within the register file.
template <class F>
constexpr int rows_in_flight() {
  return F::G / 16 >= 8 ? 2 : F::G / 16 >= 4 ? 4 : 4;
}

constexpr int MR_MAX = 8;

template <class F>
void matmul_rows(const MatmulArgs& a, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / F::BS;
  if (a.M == 1) {
    constexpr int NR = rows_in_flight<F>();
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) dot_rows_m1<F, NR>(a.x, a.w + n * a.w_stride, a.w_stride, nb, a.y + n);
    for (; n < n1; ++n) dot_rows_m1<F, 1>(a.x, a.w + n * a.w_stride, a.w_stride, nb, a.y + n);
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.w_stride;
    for (int64_t m0 = 0; m0 < a.M; m0 += MR_MAX) {
      const float* x = a.x + m0 * a.ldx;
      float* y = a.y + m0 * a.ldy + n;
      switch (a.M - m0 >= MR_MAX ? MR_MAX : a.M - m0) {
        case 1: dot_row<F, 1>(x, a.ldx, row, nb, y, a.ldy); break;
        case 2: dot_row<F, 2>(x, a.ldx, row, nb, y, a.ldy); break;
        case 3: dot_row<F, 3>(x, a.ldx, row, nb, y, a.ldy); break;
        case 4: dot_row<F, 4>(x, a.ldx, row, nb, y, a.ldy); break;
        case 5: dot_row<F, 5>(x, a.ldx, row, nb, y, a.ldy); break;
        case 6: dot_row<F, 6>(x, a.ldx, row, nb, y, a.ldy); break;
        case 7: dot_row<F, 7>(x, a.ldx, row, nb, y, a.ldy); break;
        default: dot_row<F, 8>(x, a.ldx, row, nb, y, a.ldy); break;
      }
    }
  }
}

// Nine to sixteen activation rows: the activations transposed (xt[k][16], one lane per
// row, lanes past M zero) and each weight broadcast from a decoded tile. One FMA then
// serves 16 rows with a 4-byte broadcast load, where the row-at-a-time kernel pairs every
// FMA with a full-vector load of x; measured 70 against 34 G FMA-lanes/s per core on
// dense rows (register-only peak here: 107). Every weight still takes its exact float32
// value; only the summation order differs (k in sequence per output).
template <class F>
void matmul_bcast16(const MatmulArgs& a, const float* xt, int64_t n0, int64_t n1) {
  // A tile spans KB consecutive blocks of each of 16 rows (at least 256 values), so every
  // row is read in runs of a few hundred contiguous bytes, prefetched one tile ahead:
  // one block per row at a time left 16 short interleaved streams that the hardware
  // prefetcher did not keep up with on matrices streamed from DRAM.
  constexpr int KB = F::BS >= 256 ? 1 : 256 / F::BS;
  constexpr int KT = KB * F::BS;
  const int64_t nb = a.K / F::BS;
  alignas(64) float tile[16][KT];
  for (int64_t r0 = n0; r0 < n1; r0 += 16) {
    const int nr = static_cast<int>(n1 - r0 < 16 ? n1 - r0 : 16);
    if (nr < 16) std::memset(tile, 0, sizeof(tile));
    __m512 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t ib0 = 0; ib0 < nb; ib0 += KB) {
      const int kb = static_cast<int>(nb - ib0 < KB ? nb - ib0 : KB);
      for (int r = 0; r < nr; ++r) {
        const uint8_t* row = a.w + (r0 + r) * a.w_stride + ib0 * F::TS;
        for (int64_t off = 0; off < KB * F::TS; off += 64)
          _mm_prefetch(reinterpret_cast<const char*>(row + KB * F::TS + off), _MM_HINT_T0);
        for (int b = 0; b < kb; ++b) {
          const uint8_t* blk = row + b * F::TS;
          const typename F::S s = F::prep(blk);
          for (int j = 0; j < F::BS / F::G; ++j) {
            __m512 w[F::G / 16];
            F::group(s, blk, j, w);
            for (int c = 0; c < F::G / 16; ++c) _mm512_store_ps(&tile[r][b * F::BS + j * F::G + c * 16], w[c]);
          }
        }
      }
      const float* xk = xt + ib0 * F::BS * 16;
      const int kn = kb * F::BS;
      for (int k = 0; k < kn; ++k) {
        const __m512 xv = _mm512_loadu_ps(xk + k * 16);
        for (int r = 0; r < 16; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(tile[r][k]), xv, acc[r]);
      }
    }
    // acc[r] holds output column r0 + r for every activation row (one per lane): written
    // column by column, the 16 x 16 block is 256 scalar stores into 16 rows of y whose
    // power-of-two stride (the LM head's: 1 MiB) puts them all in one cache set, so they
    // evicted each other (16% of the kernel's time). Transposed through the stack, each
    // activation row gets one 16-float store instead.
    alignas(64) float blk[16][16];
    for (int r = 0; r < 16; ++r) _mm512_store_ps(blk[r], acc[r]);
    const __m512i cols = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
    const __mmask16 keep = static_cast<__mmask16>((1u << nr) - 1u);
    for (int64_t m = 0; m < a.M; ++m)
      _mm512_mask_storeu_ps(a.y + m * a.ldy + r0, keep, _mm512_i32gather_ps(cols, &blk[0][m], 4));
  }
}

// float32 -> bfloat16 bits, round to nearest even (NaN stays a quiet NaN), as torch's cast.
inline __m256i to_bf16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                            _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

template <class F>
void dequant_row(const uint8_t* row, int64_t K, void* out, bool bf16) {
  for (int64_t ib = 0; ib < K / F::BS; ++ib) {
    const uint8_t* blk = row + ib * F::TS;
    const typename F::S s = F::prep(blk);
    for (int j = 0; j < F::BS / F::G; ++j) {
      __m512 w[F::G / 16];
      F::group(s, blk, j, w);
      const int64_t at = ib * F::BS + j * F::G;
      for (int c = 0; c < F::G / 16; ++c) {
        if (bf16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + at + c * 16), to_bf16(w[c]));
        else
          _mm512_storeu_ps(static_cast<float*>(out) + at + c * 16, w[c]);
      }
    }
  }
}

// Calls fn(F{}) with the format struct of ggml type `type` (nothing for an unknown type):
// the one place that maps type ids to formats for every kernel in this file.
template <class Fn>
void with_format(int type, Fn&& fn) {
  switch (type) {
    case Q4_0: return fn(FQ4_0{});
    case Q4_1: return fn(FQ4_1{});
    case Q5_0: return fn(FQ5_0{});
    case Q5_1: return fn(FQ5_1{});
    case Q8_0: return fn(FQ8_0{});
    case Q4_K: return fn(FQ4_K{});
    case Q5_K: return fn(FQ5_K{});
    case Q6_K: return fn(FQ6_K{});
    case F32: return fn(FF32{});
    case F16: return fn(FF16{});
    case BF16: return fn(FBF16{});
    default: return;
  }
}

// Horizontal sums of four vectors, as lanes 0..3 of the result.
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto half = [](__m512 v) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  };
  return _mm_hadd_ps(_mm_hadd_ps(half(a), half(b)), _mm_hadd_ps(half(c), half(d)));
}

}  // namespace

// Two passes over the keys (scores, then the weighted values), walking the block table
// block by block; exp is libm's scalar expf, so the probabilities are those of a plain
// float32 softmax. Scores are taken four keys at a time to share the horizontal sums.
void attend_avx512(const AttendArgs& a, const float* q, int64_t lo, int64_t hi, float* scores, float* out) {
  constexpr int MAXV = 16;  // head_dim up to 256 stays in registers
  if (a.hd % 16 || a.hd > 16 * MAXV) return attend_scalar(a, q, lo, hi, scores, out);
  const int nv = static_cast<int>(a.hd / 16);
  auto key = [&](int64_t j) {
    return a.btab[j / a.bs] * a.bs + j % a.bs;
  };
  // 16 cache values from element offset i of a row, as float32 (bfloat16: the high halves).
  const bool bf16 = a.bf16;
  auto load16 = [bf16](const void* base, int64_t i) {
    if (bf16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  };
  auto dotk = [&](int64_t slot) {
    const int64_t k = slot * a.row_stride + a.head_off;
    __m512 s = _mm512_mul_ps(_mm512_loadu_ps(q), load16(a.kc, k));
    for (int c = 1; c < nv; ++c) s = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), load16(a.kc, k + 16 * c), s);
    return s;
  };
  int64_t j = lo;
  for (; j + 4 <= hi; j += 4) {
    const __m128 s4 = _mm_mul_ps(hsum4(dotk(key(j)), dotk(key(j + 1)), dotk(key(j + 2)), dotk(key(j + 3))),
                                 _mm_set1_ps(a.scale));
    _mm_storeu_ps(scores + (j - lo), s4);
  }
  for (; j < hi; ++j) scores[j - lo] = _mm512_reduce_add_ps(dotk(key(j))) * a.scale;
  float mx = -__builtin_inff();
  for (int64_t i = 0; i < hi - lo; ++i) {
    float s = scores[i];
    if (a.softcap > 0.0f) scores[i] = s = __builtin_tanhf(s / a.softcap) * a.softcap;
    mx = s > mx ? s : mx;
  }
  float sum = 0.0f;
  for (int64_t i = 0; i < hi - lo; ++i) sum += (scores[i] = __builtin_expf(scores[i] - mx));
  __m512 acc[MAXV];
  for (int c = 0; c < nv; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t jj = lo; jj < hi; ++jj) {
    const int64_t v = key(jj) * a.row_stride + a.head_off;
    const __m512 p = _mm512_set1_ps(scores[jj - lo]);
    for (int c = 0; c < nv; ++c) acc[c] = _mm512_fmadd_ps(p, load16(a.vc, v + 16 * c), acc[c]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int c = 0; c < nv; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
}

void matmul_f32_avx512(int type, const MatmulArgs& a, int64_t n0, int64_t n1) {
  with_format(type, [&](auto f) { matmul_rows<decltype(f)>(a, n0, n1); });
}

void matmul_f32_avx512_bcast16(int type, const MatmulArgs& a, const float* xt, int64_t n0, int64_t n1) {
  with_format(type, [&](auto f) { matmul_bcast16<decltype(f)>(a, xt, n0, n1); });
}

void dequant_row_avx512(int type, const uint8_t* row, int64_t K, void* out, bool bf16) {
  with_format(type, [&](auto f) { dequant_row<decltype(f)>(row, K, out, bf16); });
}

}  // namespace mq

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif  // x86-64
