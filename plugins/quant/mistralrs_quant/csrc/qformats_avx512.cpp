// AVX-512 kernels for the F8Q8 / FP8 / HQQ formats (see qformats.h). Compiled under a
// target pragma and called only after the runtime CPU check; only intrinsics and
// file-local functions below the pragma (see ggml_kernels.h for why).
#include <cstdint>
#include <cstring>

#include "qformats.h"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#endif

#include <immintrin.h>

namespace mq {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// 32 fp8 e4m3fn codes -> their float32 values divided by 256, exactly. The code's
// exponent and mantissa bits moved up by 7 form an IEEE half of value q / 256 (normal and
// subnormal codes alike: both formats have no implicit bit below their smallest
// exponent), the sign lands in bit 15 through the sign extension, and vcvtph2ps converts
// half subnormals exactly whatever MXCSR's denormals-are-zero says. 0x7F/0xFF are NaN.
inline void fp8x32_div256(const uint8_t* p, __m512* lo, __m512* hi) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  __m512i h = _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(b), 7),
                               _mm512_set1_epi16(static_cast<short>(0xBF80)));
  const __m256i m7f = _mm256_set1_epi8(0x7F);
  const __mmask32 nan = _mm256_cmpeq_epi8_mask(_mm256_and_si256(b, m7f), m7f);
  h = _mm512_mask_mov_epi16(h, nan, _mm512_set1_epi16(0x7E00));
  *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

void decode_f8q8(const FmtWeight& f, int64_t n, float* o) {
  const int64_t nb = f.K / 32;
  const uint8_t* row = f.w + n * nb * 33;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * 33;
    const __m512 d = _mm512_set1_ps(fp8_table[blk[0]] / 448.0f);
    const __m512i q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 1)));
    const __m512i q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 17)));
    _mm512_storeu_ps(o + 32 * b, _mm512_mul_ps(_mm512_cvtepi32_ps(q0), d));
    _mm512_storeu_ps(o + 32 * b + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(q1), d));
  }
}

// FP8: q (per tensor, scale applied to the product) or q * s (blocks): (q / 256) times
// (256 or 256 s) is exactly that product, powers of two scaling without rounding.
void decode_fp8(const FmtWeight& f, int64_t n, float* o) {
  const int64_t K = f.K;
  const uint8_t* row = f.w + n * K;
  const bool block = f.kind == FMT_FP8_BLOCK;
  const int64_t bc = block ? f.bc : K;
  const float* srow = block ? f.scale + (n / f.br) * ((K + f.bc - 1) / f.bc) : nullptr;
  int64_t k = 0;
  while (k < K) {
    const int64_t kb = k / bc, end = min64(K, (kb + 1) * bc);
    const float s = block ? srow[kb] : 1.0f;
    const __m512 mul = _mm512_set1_ps(s * 256.0f);
    for (; k + 32 <= end; k += 32) {
      __m512 lo, hi;
      fp8x32_div256(row + k, &lo, &hi);
      _mm512_storeu_ps(o + k, _mm512_mul_ps(lo, mul));
      _mm512_storeu_ps(o + k + 16, _mm512_mul_ps(hi, mul));
    }
    for (; k < end; ++k) o[k] = block ? fp8_table[row[k]] * s : fp8_table[row[k]];
  }
}

// HQQ: a weight row is one or more runs of consecutive groups (columns of the [G, ncols]
// view), read as runs of codes, scales and -zero*scale; q s + (-z s) in one FMA, as the
// torch path's addcmul computes on AVX CPUs.
void decode_hqq(const FmtWeight& f, int64_t n, float* o) {
  const int64_t K = f.K, G = f.br, ncols = f.N * K / G, half = G / 2;
  const bool four = f.kind == FMT_HQQ4;
  const __m512i m15 = _mm512_set1_epi32(15);
  for (int64_t k = 0; k < K;) {
    const int64_t flat = n * K + k, r = flat / ncols, c = flat % ncols;
    const int64_t len = min64(K - k, ncols - c);
    const bool high = four && r < half;
    const uint8_t* q = f.w + ((four && !high) ? r - half : r) * ncols + c;
    const float* s = f.scale + c;
    const float* z = f.aux + c;
    float* out = o + k;
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = len - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                        : static_cast<__mmask16>((1u << (len - i)) - 1u);
      __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, q + i));
      if (four) v = high ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, m15);
      const __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_maskz_loadu_ps(m, s + i),
                                       _mm512_maskz_loadu_ps(m, z + i));
      _mm512_mask_storeu_ps(out + i, m, w);
    }
    k += len;
  }
}

// One decoded weight row against MR activation rows; four independent accumulator chains
// per row hide the FMA latency when MR is small.
template <int MR>
inline void dot_row(const float* x, int64_t K, const float* w, float* y, int64_t ldy) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int a = 0; a < 4; ++a) acc[m][a] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {
      const __m512 wv = _mm512_loadu_ps(w + k + 16 * a);
#pragma GCC unroll 4
      for (int m = 0; m < MR; ++m)
        acc[m][a] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16 * a), wv, acc[m][a]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512 wv = _mm512_maskz_loadu_ps(mk, w + k);
    for (int m = 0; m < MR; ++m) acc[m][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, x + m * K + k), wv, acc[m][0]);
  }
  for (int m = 0; m < MR; ++m)
    y[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                    _mm512_add_ps(acc[m][2], acc[m][3])));
}

// Decode-and-dot in registers for M <= 4 (no tile round trip through L1): one weight row
// against MR activation rows, 32 weights at a time, two accumulator chains per row.
template <int MR, class Dec>
inline void direct_row(const float* x, int64_t K, float* y, int64_t ldy, Dec&& dec) {
  __m512 acc[MR][2];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512 w0, w1;
    dec(k, &w0, &w1);
#pragma GCC unroll 4
    for (int m = 0; m < MR; ++m) {
      acc[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k), w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16), w1, acc[m][1]);
    }
  }
  for (int m = 0; m < MR; ++m) y[m * ldy] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

template <int MR>
void direct_rows(const FmtWeight& f, const float* x, float* y, int64_t n0, int64_t n1) {
  const int64_t K = f.K;
  for (int64_t n = n0; n < n1; ++n) {
    if (f.kind == FMT_F8Q8) {
      const uint8_t* row = f.w + n * (K / 32) * 33;
      direct_row<MR>(x, K, y + n, f.N, [&](int64_t k, __m512* w0, __m512* w1) {
        const uint8_t* blk = row + (k / 32) * 33;
        _mm_prefetch(reinterpret_cast<const char*>(blk + 1024), _MM_HINT_T0);
        const __m512 d = _mm512_set1_ps(fp8_table[blk[0]] / 448.0f);
        *w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 1)))), d);
        *w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 17)))), d);
      });
    } else {
      const uint8_t* row = f.w + n * K;
      const bool block = f.kind == FMT_FP8_BLOCK;
      const int64_t bc = block ? f.bc : K;
      const float* srow = block ? f.scale + (n / f.br) * ((K + f.bc - 1) / f.bc) : nullptr;
      direct_row<MR>(x, K, y + n, f.N, [&](int64_t k, __m512* w0, __m512* w1) {
        _mm_prefetch(reinterpret_cast<const char*>(row + k + 1024), _MM_HINT_T0);
        const __m512 mul = _mm512_set1_ps(block ? srow[k / bc] * 256.0f : 256.0f);
        fp8x32_div256(row + k, w0, w1);
        *w0 = _mm512_mul_ps(*w0, mul);
        *w1 = _mm512_mul_ps(*w1, mul);
      });
    }
  }
}

}  // namespace

bool fmt_direct_avx512_supports(const FmtWeight& f, int64_t M) {
  if (M < 1 || M > 4 || f.K % 32) return false;
  return f.kind == FMT_F8Q8 || f.kind == FMT_FP8 || (f.kind == FMT_FP8_BLOCK && f.bc % 32 == 0);
}

void fmt_matmul_direct_avx512(const FmtWeight& f, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return direct_rows<1>(f, x, y, n0, n1);
    case 2: return direct_rows<2>(f, x, y, n0, n1);
    case 3: return direct_rows<3>(f, x, y, n0, n1);
    default: return direct_rows<4>(f, x, y, n0, n1);
  }
}

void fmt_decode_rows_avx512(const FmtWeight& f, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * f.K;
    switch (f.kind) {
      case FMT_F8Q8: decode_f8q8(f, n, o); break;
      case FMT_FP8:
      case FMT_FP8_BLOCK: decode_fp8(f, n, o); break;
      case FMT_HQQ4:
      case FMT_HQQ8: decode_hqq(f, n, o); break;
      default: break;
    }
  }
}

// Four weight rows against four activation rows: 16 accumulators, 8 loads per 16 FMAs
// (row-at-a-time needs 5 per 4), for M > 4 where the dot, not the decode, bounds the time.
static inline void dot_4x4(const float* x, int64_t K, const float* w, float* y, int64_t ldy) {
  __m512 acc[4][4];
  for (int m = 0; m < 4; ++m)
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[4];
    for (int r = 0; r < 4; ++r) wv[r] = _mm512_maskz_loadu_ps(mk, w + r * K + k);
    for (int m = 0; m < 4; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + m * K + k);
      for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < 4; ++m)
    for (int r = 0; r < 4; ++r) y[m * ldy + r] = _mm512_reduce_add_ps(acc[m][r]);
}

void fmt_dot_tile_avx512(const float* x, int64_t M, int64_t K, const float* tile, int64_t rows, float* y,
                         int64_t ldy) {
  int64_t r0 = 0;
  if (M > 4) {
    for (; r0 + 4 <= rows; r0 += 4)
      for (int64_t m0 = 0; m0 + 4 <= M; m0 += 4) dot_4x4(x + m0 * K, K, tile + r0 * K, y + m0 * ldy + r0, ldy);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* w = tile + r * K;
    // rows r < r0 have their first M / 4 * 4 activation rows done above
    const int64_t mdone = r < r0 ? M / 4 * 4 : 0;
    for (int64_t m0 = mdone; m0 < M; m0 += 4) {
      const float* xm = x + m0 * K;
      float* ym = y + m0 * ldy + r;
      switch (M - m0 >= 4 ? 4 : M - m0) {
        case 1: dot_row<1>(xm, K, w, ym, ldy); break;
        case 2: dot_row<2>(xm, K, w, ym, ldy); break;
        case 3: dot_row<3>(xm, K, w, ym, ldy); break;
        default: dot_row<4>(xm, K, w, ym, ldy); break;
      }
    }
  }
}

void f32_to_bf16_avx512(const float* in, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(in + i);
    const __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                              _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(r));
  }
}

}  // namespace mq

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif  // x86-64
