// The AVX-512 small-M kernel, included by two translation units compiled for different
// targets: dense_small_m_avx512.cpp (AVX-512F: widen to float32, FMA) and
// dense_small_m_bf16.cpp (AVX-512 BF16: vdpbf16ps on the bf16 pairs directly). Everything
// here is in an unnamed namespace, so each unit keeps its own copy compiled for its target.
//
// A register block is R weight rows x MB activation rows of float32 accumulators (at most
// 16 of the 32 zmm registers), each row a stream from memory, with the next block
// prefetched. For M > MB the block's rows are re-read
// from L1 for each group of MB activation rows. Rows past the end of a tile repeat the
// last row (their sums are computed and discarded), so one instantiation serves every N.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "dense_small_m.h"

namespace {

using mq_dense::Args;
using mq_dense::TILE_STRIDE;

// Prefetch the row block PF_BLOCKS ahead into L1: without it the step bench ran ~40%
// slower; 2-4 blocks ahead or into L2 only (T1) measured the same or slower.
constexpr int PF_BLOCKS = 1;

inline __m512 widen16(__m256i h, bool f16) {
  if (f16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m256i narrow16(__m512 v, bool f16) {
  if (f16) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // bf16, round to nearest even; NaN stays a (quiet) NaN of the same sign.
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// Sums of four accumulators as one 4-lane vector.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto half = [](__m512 v) {
    const __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  };
  return _mm_hadd_ps(_mm_hadd_ps(half(a), half(b)), _mm_hadd_ps(half(c), half(d)));
}

// exp(t) to a few float32 ulps: t = n ln2 + r, |r| <= ln2/2, a degree-7 Taylor polynomial
// (truncation below 1e-8 relative), scaled by 2^n with scalef (which saturates to 0/inf).
inline __m512 exp512(__m512 t) {
  t = _mm512_max_ps(_mm512_min_ps(t, _mm512_set1_ps(100.f)), _mm512_set1_ps(-100.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(t, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), t);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// gelu_tanh(v) = v (1 + tanh(u)) / 2 = v / (1 + exp(-2u)), u = sqrt(2/pi) (v + 0.044715 v^3):
// the second form has no cancellation where tanh(u) nears -1.
inline __m512 gelu_tanh512(__m512 v) {
  const __m512 v2 = _mm512_mul_ps(v, v);
  const __m512 inner = _mm512_fmadd_ps(v2, _mm512_set1_ps(0.044715f), _mm512_set1_ps(1.f));
  const __m512 u2 = _mm512_mul_ps(_mm512_mul_ps(v, inner), _mm512_set1_ps(-2.f * 0.7978845608028654f));
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(u2)));
}

// Bias, activation, residual and the one rounding, for rows [n0, n1) of every output row.
void epilogue(const Args& a, int64_t n0, int64_t n1, const float* buf) {
  const int64_t cnt = n1 - n0;
  for (int64_t m = 0; m < a.m; ++m) {
    for (int64_t j = 0; j < cnt; j += 16) {
      const __mmask16 mk = cnt - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (cnt - j)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(mk, buf + m * TILE_STRIDE + j);
      if (a.bias) v = _mm512_add_ps(v, widen16(_mm256_maskz_loadu_epi16(mk, a.bias + n0 + j), a.f16));
      if (a.act == 1) v = gelu_tanh512(v);
      if (a.other)
        v = _mm512_add_ps(v, widen16(_mm256_maskz_loadu_epi16(mk, a.other + m * a.so + n0 + j), a.f16));
      _mm256_mask_storeu_epi16(a.y + m * a.sy + n0 + j, mk, narrow16(v, a.f16));
    }
  }
}

template <int R, int MB>
inline void store_sums(__m512 (&acc)[R][MB], float* out) {
  for (int mb = 0; mb < MB; ++mb)
    for (int r = 0; r < R; r += 4)
      _mm_storeu_ps(out + mb * TILE_STRIDE + r, reduce4(acc[r][mb], acc[r + 1][mb], acc[r + 2][mb], acc[r + 3][mb]));
}

#ifdef MQ_DENSE_DPBF16
// vdpbf16ps: 32 bf16 products per instruction, summed in pairs into 16 float32 lanes.
template <int R, int MB>
void block(const Args& a, const uint16_t* const* wr, int64_t next, int64_t m0, float* out) {
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int mb = 0; mb < MB; ++mb) acc[r][mb] = _mm512_setzero_ps();
  const int64_t k = a.k, kfull = k & ~int64_t(31);
  const uint16_t* x = a.xh + m0 * a.kp;
  for (int64_t kk = 0; kk < kfull; kk += 32) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = _mm512_loadu_si512(wr[r] + kk);
      if (PF_BLOCKS) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + next + kk), _MM_HINT_T0);
    }
    for (int mb = 0; mb < MB; ++mb) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + mb * a.kp + kk);
      for (int r = 0; r < R; ++r) acc[r][mb] = _mm512_dpbf16_ps(acc[r][mb], (__m512bh)wv[r], xv);
    }
  }
  if (kfull < k) {
    const __mmask32 mk = (__mmask32)((1ull << (k - kfull)) - 1);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mk, wr[r] + kfull);
    for (int mb = 0; mb < MB; ++mb) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + mb * a.kp + kfull);  // zero past k
      for (int r = 0; r < R; ++r) acc[r][mb] = _mm512_dpbf16_ps(acc[r][mb], (__m512bh)wv[r], xv);
    }
  }
  store_sums<R, MB>(acc, out);
}
#else
// Widen 16 weights to float32 (exact), FMA with the float32 activations.
template <int R, int MB>
void block(const Args& a, const uint16_t* const* wr, int64_t next, int64_t m0, float* out) {
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int mb = 0; mb < MB; ++mb) acc[r][mb] = _mm512_setzero_ps();
  const int64_t k = a.k, kfull = k & ~int64_t(15);
  const float* x = a.xf + m0 * a.kp;
  const bool f16 = a.f16;
  for (int64_t kk = 0; kk < kfull; kk += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r] + kk)), f16);
      if (PF_BLOCKS && !(kk & 31)) _mm_prefetch(reinterpret_cast<const char*>(wr[r] + next + kk), _MM_HINT_T0);
    }
    for (int mb = 0; mb < MB; ++mb) {
      const __m512 xv = _mm512_loadu_ps(x + mb * a.kp + kk);
      for (int r = 0; r < R; ++r) acc[r][mb] = _mm512_fmadd_ps(wv[r], xv, acc[r][mb]);
    }
  }
  if (kfull < k) {
    const __mmask16 mk = (__mmask16)((1u << (k - kfull)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = widen16(_mm256_maskz_loadu_epi16(mk, wr[r] + kfull), f16);
    for (int mb = 0; mb < MB; ++mb) {
      const __m512 xv = _mm512_loadu_ps(x + mb * a.kp + kfull);  // zero past k
      for (int r = 0; r < R; ++r) acc[r][mb] = _mm512_fmadd_ps(wv[r], xv, acc[r][mb]);
    }
  }
  store_sums<R, MB>(acc, out);
}
#endif

template <int R, int MBMAX>
void rows(const Args& a, int64_t n0, int64_t n1, float* buf) {
  for (int64_t n = n0; n < n1; n += R) {
    const uint16_t* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = a.w + std::min(n + r, n1 - 1) * a.sw;
    const int64_t next = PF_BLOCKS * R * a.sw;
    float* out = buf + (n - n0);
    int64_t m0 = 0;
    for (; m0 + MBMAX <= a.m; m0 += MBMAX) block<R, MBMAX>(a, wr, next, m0, out + m0 * TILE_STRIDE);
    switch (a.m - m0) {
      case 1: block<R, 1>(a, wr, next, m0, out + m0 * TILE_STRIDE); break;
      case 2: if constexpr (MBMAX > 2) block<R, 2>(a, wr, next, m0, out + m0 * TILE_STRIDE); break;
      case 3: if constexpr (MBMAX > 3) block<R, 3>(a, wr, next, m0, out + m0 * TILE_STRIDE); break;
      default: break;
    }
  }
}

void tile(const Args& a, int64_t n0, int64_t n1, float* buf) {
  // 4 weight rows x up to 4 activation rows. 8, 12 or 16 weight rows for 1-2 activation
  // rows were measured 4-15% slower (with the prefetch one block ahead).
  if (a.m == 1)
    rows<4, 1>(a, n0, n1, buf);
  else if (a.m == 2)
    rows<4, 2>(a, n0, n1, buf);
  else
    rows<4, 4>(a, n0, n1, buf);
  epilogue(a, n0, n1, buf);
}

}  // namespace
