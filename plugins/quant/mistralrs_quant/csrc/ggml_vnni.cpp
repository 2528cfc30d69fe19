// AVX-512 VNNI kernels: the integer-dot variant (ggml's approach), opt-in.
//
// Activations are quantized once per call to int8 per 32 elements (scale amax/127), then
// every 32 weights contribute through one vpdpbusd (unsigned weight codes x signed
// activation codes, exact int32 sums) and one float32 FMA with the two block scales. The
// only approximation is the activation rounding: |x - dx q| <= dx/2 = amax/254 per element.
//   signed codes (Q4_0, Q5_0, Q8_0: w = a (u - k)): sum x_q (u - k) is formed exactly in
//     integers (the -k sum q correction seeds the accumulator), so the error is bounded by
//     sum_i amax(block(i))/254 |w_i|;
//   codes with a min (Q4_1, Q4_K: w = a u + b): b times the exact float sum of the block's
//     activations, so the error is bounded by sum_i amax/254 |w_i - b_i|.
// 256-bit vectors: their integer and FMA ops issue on three ports, 512-bit ones on two.
#include <cstdint>
#include <cstring>

#include "ggml_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")
#endif

#include <immintrin.h>

namespace mq {
namespace {

inline const float* f16_ptr(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_table + h;
}

inline __m256i nibbles32(const uint8_t* qs) {  // 16 bytes -> 32 codes: low nibbles, then high
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// A format: BS, TS; SUBS = 32-element sub-blocks per block; KSHIFT = log2 of the code
// offset k for signed formats, -1 for formats with a min. sub() gives sub-block j's 32
// unsigned codes, a pointer to its scale a and (min formats) its offset b.
struct VQ4_0 {
  static constexpr int BS = 32, TS = 18, SUBS = 1, KSHIFT = 3;
  struct S {};
  static S prep(const uint8_t*) { return {}; }
  static __m256i sub(const S&, const uint8_t* b, int, const float** a, float*) {
    *a = f16_ptr(b);
    return nibbles32(b + 2);
  }
};

struct VQ4_1 {
  static constexpr int BS = 32, TS = 20, SUBS = 1, KSHIFT = -1;
  struct S {};
  static S prep(const uint8_t*) { return {}; }
  static __m256i sub(const S&, const uint8_t* b, int, const float** a, float* m) {
    *a = f16_ptr(b);
    *m = *f16_ptr(b + 2);
    return nibbles32(b + 4);
  }
};

struct VQ5_0 {
  static constexpr int BS = 32, TS = 22, SUBS = 1, KSHIFT = 4;
  struct S {};
  static S prep(const uint8_t*) { return {}; }
  static __m256i sub(const S&, const uint8_t* b, int, const float** a, float*) {
    *a = f16_ptr(b);
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const __m256i n = nibbles32(b + 6);
    return _mm256_mask_add_epi8(n, static_cast<__mmask32>(qh), n, _mm256_set1_epi8(16));
  }
};

struct VQ8_0 {
  static constexpr int BS = 32, TS = 34, SUBS = 1, KSHIFT = 7;
  struct S {};
  static S prep(const uint8_t*) { return {}; }
  static __m256i sub(const S&, const uint8_t* b, int, const float** a, float*) {
    *a = f16_ptr(b);
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
    return _mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80)));  // q + 128
  }
};

struct VQ4_K {
  static constexpr int BS = 256, TS = 144, SUBS = 8, KSHIFT = -1;
  struct S { float a[8], b[8]; };
  static S prep(const uint8_t* blk) {
    S s;
    const float d = *f16_ptr(blk), dmin = *f16_ptr(blk + 2);
    const uint8_t* q = blk + 4;
    for (int j = 0; j < 8; ++j) {
      const int sc = j < 4 ? q[j] & 63 : (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
      const int mn = j < 4 ? q[j + 4] & 63 : (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
      s.a[j] = d * static_cast<float>(sc);
      s.b[j] = -(dmin * static_cast<float>(mn));
    }
    return s;
  }
  static __m256i sub(const S& s, const uint8_t* blk, int j, const float** a, float* m) {
    *a = s.a + j;
    *m = s.b[j];
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * (j >> 1)));
    return _mm256_and_si256(j & 1 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
  }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <class V, int MR>
inline void dot_row(const QuantizedActs& qa, int64_t m0, const uint8_t* row, int64_t nb, float* y, int64_t ldy) {
  constexpr bool MIN = V::KSHIFT < 0;
  const int64_t K = qa.K, nsub = K / 32;
  __m256 acc[MR];
  float macc[MR];
  for (int m = 0; m < MR; ++m) {
    acc[m] = _mm256_setzero_ps();
    macc[m] = 0.0f;
  }
  for (int64_t ib = 0; ib < nb; ++ib) {
    const uint8_t* blk = row + ib * V::TS;
    _mm_prefetch(reinterpret_cast<const char*>(blk + 4096), _MM_HINT_T0);
    const typename V::S s = V::prep(blk);
    for (int j = 0; j < V::SUBS; ++j) {
      const float* a;
      float b = 0.0f;
      const __m256i u = V::sub(s, blk, j, &a, &b);
      const __m256 av = _mm256_broadcast_ss(a);
      const int64_t g = ib * V::SUBS + j;
      for (int m = 0; m < MR; ++m) {
        const int64_t r = m0 + m;
        __m256i p = _mm256_setzero_si256();
        if (!MIN)  // seeds the sum with -k * (sum of each lane's 4 activation codes)
          p = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa.nsum4 + r * (K / 4) + g * 8)),
                                MIN ? 0 : V::KSHIFT);
        p = _mm256_dpbusd_epi32(p, u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qa.q + r * K + g * 32)));
        const __m256 scale = _mm256_mul_ps(av, _mm256_broadcast_ss(qa.d + r * nsub + g));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[m]);
        if (MIN) macc[m] += b * qa.s[r * nsub + g];
      }
    }
  }
  for (int m = 0; m < MR; ++m) y[m * ldy] = hsum(acc[m]) + macc[m];
}

template <class V>
void matmul_rows(const QuantizedActs& qa, const MatmulArgs& a, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / V::BS;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.w_stride;
    for (int64_t m0 = 0; m0 < a.M; m0 += 8) {
      float* y = a.y + m0 * a.ldy + n;
      switch (a.M - m0 >= 8 ? 8 : a.M - m0) {
        case 1: dot_row<V, 1>(qa, m0, row, nb, y, a.ldy); break;
        case 2: dot_row<V, 2>(qa, m0, row, nb, y, a.ldy); break;
        case 3: dot_row<V, 3>(qa, m0, row, nb, y, a.ldy); break;
        case 4: dot_row<V, 4>(qa, m0, row, nb, y, a.ldy); break;
        case 5: dot_row<V, 5>(qa, m0, row, nb, y, a.ldy); break;
        case 6: dot_row<V, 6>(qa, m0, row, nb, y, a.ldy); break;
        case 7: dot_row<V, 7>(qa, m0, row, nb, y, a.ldy); break;
        default: dot_row<V, 8>(qa, m0, row, nb, y, a.ldy); break;
      }
    }
  }
}

}  // namespace

bool vnni_supports(int type) {
  return type == Q4_0 || type == Q4_1 || type == Q5_0 || type == Q8_0 || type == Q4_K;
}

// Per row of x and 32-block g: codes q = round(x / d) with d = amax / 127 (0 for an all-zero
// block), d, the exact float sum s of the 32 activations, and per group of 4 codes the
// negated sum (the seed of the signed formats' correction).
void quantize_acts_avx512vnni(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, float* d, float* s,
                              int32_t* nsum4) {
  const int64_t nsub = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < nsub; ++g) {
      const float* xb = x + m * ldx + g * 32;
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float dd = amax / 127.0f;
      const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, id));
      int8_t* qb = q + m * K + g * 32;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtsepi32_epi8(q1));
      d[m * nsub + g] = dd;
      s[m * nsub + g] = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
      // Lane i of the dot sums codes 4i..4i+3: same grouping here.
      const __m512i ones = _mm512_set1_epi8(1);
      const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb));
      const __m256i sum4 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm512_castsi512_si256(ones), codes);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(nsum4 + m * (K / 4) + g * 8),
                          _mm256_sub_epi32(_mm256_setzero_si256(), sum4));
    }
  }
}

void matmul_i8_avx512vnni(int type, const QuantizedActs& qa, const MatmulArgs& a, int64_t n0, int64_t n1) {
  switch (type) {
    case Q4_0: matmul_rows<VQ4_0>(qa, a, n0, n1); break;
    case Q4_1: matmul_rows<VQ4_1>(qa, a, n0, n1); break;
    case Q5_0: matmul_rows<VQ5_0>(qa, a, n0, n1); break;
    case Q8_0: matmul_rows<VQ8_0>(qa, a, n0, n1); break;
    case Q4_K: matmul_rows<VQ4_K>(qa, a, n0, n1); break;
    default: break;
  }
}

}  // namespace mq

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif  // x86-64
