// Quantizers for the ggml block formats (K-quants, and the 32-element formats when an
// importance matrix weights them), producing the same bytes as llama.cpp's reference
// quantizer.
//
// Bit-exactness rests on doing the same float32 operations in the same order: every sum
// is accumulated left to right in float32, products are grouped as written in the
// comments below, nothing is fused (-ffp-contract=off, no -ffast-math: GCC then keeps
// the reductions sequential), and rounding to the nearest integer is round-half-even
// (the magic-number trick, valid for |x| < 2^22), as in ggml. The tests compare the bytes
// against outputs of llama.cpp's ggml_quantize_chunk stored as test data.
//
// Rows are independent, so the quantization runs in parallel over rows (mq_parallel.h);
// each row is computed by one thread whatever the thread count.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "mq_parallel.h"

namespace {

constexpr int QK = 256;
constexpr float EPS = 1e-15f;  // below this a group is treated as all zeros

inline int round_even(float v) {
  float t = v + 12582912.f;  // 1.5 * 2^23: the addition rounds to an integer (half to even)
  int32_t i;
  std::memcpy(&i, &t, 4);
  return (i & 0x007fffff) - 0x00400000;
}

inline int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// float32 -> IEEE half, round to nearest even (what F16C and ggml's software path give).
uint16_t to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  uint32_t ax = x & 0x7fffffff;
  if (ax >= 0x7f800000) return static_cast<uint16_t>(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));
  if (ax >= 0x477ff000) return static_cast<uint16_t>(sign | 0x7c00);  // rounds past the largest half
  if (ax < 0x38800000) {                                             // half subnormal or zero
    if (ax < 0x33000000) return static_cast<uint16_t>(sign);
    const int e = static_cast<int>(ax >> 23);
    uint32_t m = (ax & 0x7fffff) | 0x800000;
    const int shift = 126 - e;  // so that the result counts units of 2^-24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = ((ax >> 13) - (112u << 10));
  const uint32_t rem = ax & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
  return static_cast<uint16_t>(sign | r);
}

float from_half(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff, x;
  if (e == 0) {
    if (m == 0) {
      x = sign;
    } else {
      int k = -1;
      do { ++k; m <<= 1; } while (!(m & 0x400));
      x = sign | ((112u - k) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (e == 31) {
    x = sign | 0x7f800000 | (m << 13);
  } else {
    x = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline float rt_half(float f) { return from_half(to_half(f)); }
inline void put_half(uint8_t* p, float f) { const uint16_t h = to_half(f); std::memcpy(p, &h, 2); }

// Symmetric codes l in [-nmax, nmax-1] stored as l + nmax; the returned scale minimises
// sum w (x - scale*l)^2 over 19 candidate inverse scales around -nmax/max. Weights: qw,
// else x^2 (the only rmse type the K-quants use).
float fit_symmetric(int n, int nmax, const float* x, int8_t* L, const float* qw) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) { amax = ax; max = x[i]; }
  }
  if (amax < EPS) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = clampi(round_even(iscale * x[i]), -nmax, nmax - 1);
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = qw ? qw[i] : x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clampi(round_even(iscale * x[i]), -nmax, nmax - 1);
      const float w = qw ? qw[i] : x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(nmax + clampi(round_even(iscale * x[i]), -nmax, nmax - 1));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Affine codes l in [0, nmax] with x ≈ scale*l - the_min (the_min >= 0): start from the
// min/max grid, then nstep+1 candidate inverse scales each refit by weighted least squares,
// keeping the lowest weighted error (absolute when mad). `empty_if_flat` distinguishes the
// two reference variants' degenerate-range tests (max == min vs max <= min).
float fit_affine(int n, int nmax, const float* x, const float* w, uint8_t* L, float* the_min, uint8_t* Laux,
                 float rmin, float rdelta, int nstep, bool mad) {
  float min = x[0], max = x[0];
  float sum_w = w[0], sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max <= min) {  // max == min after the clamp above (max >= min always holds)
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best = 0;
  for (int i = 0; i < n; ++i) {
    L[i] = static_cast<uint8_t>(clampi(round_even(iscale * (x[i] - min)), 0, nmax));
    float diff = scale * L[i] + min - x[i];
    diff = mad ? std::fabs(diff) : diff * diff;
    best += w[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clampi(round_even(iscale * (x[i] - min)), 0, nmax);
      Laux[i] = static_cast<uint8_t>(l);
      sum_l += w[i] * l;
      sum_l2 += w[i] * l * l;
      sum_xl += w[i] * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float err = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = mad ? std::fabs(diff) : diff * diff;
        err += w[i] * diff;
      }
      if (err < best) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best = err;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

// The affine fit of 8 sub-blocks at once, one per vector lane: each lane performs exactly
// the float32 operations of fit_affine in the same order (lane-wise IEEE ops round as the
// scalar ones do), so the results are bit-identical; only the 8 independent searches run
// side by side. Used for the 8 sub-blocks of a Q4_K/Q5_K super-block without an imatrix,
// the hot path of ISQ to those types. n = 32, mad = false.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// Bit reinterpretations (memcpy: a C-style cast between vector types may convert values).
inline v8i bits_of(v8f v) {
  v8i i;
  std::memcpy(&i, &v, sizeof i);
  return i;
}

inline v8f float_of(v8i i) {
  v8f v;
  std::memcpy(&v, &i, sizeof v);
  return v;
}

inline v8i round_even_v(v8f v) {
  return (bits_of(v + 12582912.f) & 0x007fffff) - 0x00400000;
}

inline v8i clamp_v(v8i l, int hi) {
  l = l < 0 ? 0 : l;
  return l > hi ? hi : l;
}

inline v8f to_f(v8i l) { return __builtin_convertvector(l, v8f); }

// Cloned for AVX2 (one 8-lane register per vector, native integer min/max/blend) and the
// baseline, picked at load time; lane-wise IEEE results are the same on either.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void fit_affine_v8(int nmax, const v8f* x, const v8f* w, v8i* L, v8f* the_min, v8f* scale_out, float rmin,
                   float rdelta, int nstep) {
  constexpr int n = 32;
  v8i Laux[n];
  v8f mn = x[0], mx = x[0];
  v8f sum_w = w[0], sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    mn = x[i] < mn ? x[i] : mn;
    mx = x[i] > mx ? x[i] : mx;
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  const v8f zero = {0, 0, 0, 0, 0, 0, 0, 0};
  mn = mn > 0 ? zero : mn;
  const v8f mn0 = mn;
  const v8i flat = mx <= mn;
  const v8f range = mx - mn;
  v8f iscale = static_cast<float>(nmax) / range;
  v8f scale = 1.0f / iscale;
  v8f best = zero;
  for (int i = 0; i < n; ++i) {
    L[i] = clamp_v(round_even_v(iscale * (x[i] - mn)), nmax);
    const v8f diff = scale * to_f(L[i]) + mn - x[i];
    best += w[i] * (diff * diff);
  }
  for (int is = 0; is <= nstep; ++is) {
    // (mx - mn) with the current mn: the reference refits against the best offset so far.
    const float num = rmin + rdelta * is + nmax;
    iscale = num / (mx - mn);
    v8f sum_l = zero, sum_l2 = zero, sum_xl = zero;
    for (int i = 0; i < n; ++i) {
      Laux[i] = clamp_v(round_even_v(iscale * (x[i] - mn)), nmax);
      const v8f l = to_f(Laux[i]);
      sum_l += w[i] * l;
      sum_l2 += w[i] * l * l;
      sum_xl += w[i] * l * x[i];
    }
    const v8f D = sum_w * sum_l2 - sum_l * sum_l;
    v8f ts = (sum_w * sum_xl - sum_x * sum_l) / D;
    v8f tm = (sum_l2 * sum_x - sum_l * sum_xl) / D;
    const v8i pos = tm > 0;
    tm = pos ? zero : tm;
    ts = pos ? sum_xl / sum_l2 : ts;
    v8f err = zero;
    for (int i = 0; i < n; ++i) {
      const v8f diff = ts * to_f(Laux[i]) + tm - x[i];
      err += w[i] * (diff * diff);
    }
    const v8i take = (D > 0) & (err < best);
    for (int i = 0; i < n; ++i) L[i] = take ? Laux[i] : L[i];
    best = take ? err : best;
    scale = take ? ts : scale;
    mn = take ? tm : mn;
  }
  const v8i zi = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; ++i) L[i] = flat ? zi : L[i];
  *scale_out = flat ? zero : scale;
  *the_min = -(flat ? mn0 : mn);
}

// fit_symmetric without an imatrix (weights x^2) for 8 sub-blocks of 16 at once, one per
// lane, the same float32 operations in the same order as the scalar version (Q6_K's hot
// path). L receives l + nmax.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void fit_symmetric_v8(int nmax, const v8f* x, v8i* L, v8f* scale_out) {
  constexpr int n = 16;
  const v8f zero = {0, 0, 0, 0, 0, 0, 0, 0};
  const v8i zi = {0, 0, 0, 0, 0, 0, 0, 0};
  v8f mx = zero, amax = zero;
  for (int i = 0; i < n; ++i) {
    const v8f ax = float_of(bits_of(x[i]) & 0x7fffffff);
    const v8i gt = ax > amax;
    amax = gt ? ax : amax;
    mx = gt ? x[i] : mx;
  }
  const v8i tiny = amax < EPS;
  v8f iscale = static_cast<float>(-nmax) / mx;
  v8f sumlx = zero, suml2 = zero;
  for (int i = 0; i < n; ++i) {
    v8i l = round_even_v(iscale * x[i]);
    l = l < -nmax ? -nmax : l;
    l = l > nmax - 1 ? nmax - 1 : l;
    L[i] = l + nmax;
    const v8f w = x[i] * x[i];
    const v8f fl = to_f(l);
    sumlx += w * x[i] * fl;
    suml2 += w * fl * fl;
  }
  v8f scale = suml2 != 0 ? sumlx / suml2 : zero;
  v8f best = scale * sumlx;
  v8i cand[n];
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    const float num = -(nmax + 0.1f * is);
    iscale = num / mx;
    sumlx = suml2 = zero;
    for (int i = 0; i < n; ++i) {
      v8i l = round_even_v(iscale * x[i]);
      l = l < -nmax ? -nmax : l;
      l = l > nmax - 1 ? nmax - 1 : l;
      cand[i] = l + nmax;
      const v8f w = x[i] * x[i];
      const v8f fl = to_f(l);
      sumlx += w * x[i] * fl;
      suml2 += w * fl * fl;
    }
    const v8i take = (suml2 > 0) & (sumlx * sumlx > best * suml2);
    for (int i = 0; i < n; ++i) L[i] = take ? cand[i] : L[i];
    const v8f ns = sumlx / suml2;
    scale = take ? ns : scale;
    best = take ? ns * sumlx : best;
  }
  for (int i = 0; i < n; ++i) L[i] = tiny ? zi : L[i];
  *scale_out = tiny ? zero : scale;
}

// 3-bit symmetric codes with coordinate-descent refinement (Q3_K without an imatrix).
float fit_q3(int n, int nmax, const float* x, int8_t* L) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) { amax = ax; max = x[i]; }
  }
  if (amax < EPS) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  const float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = clampi(round_even(iscale * x[i]), -nmax, nmax - 1);
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * L[i];
      if (slx > 0) {
        float sl2 = suml2 - w * L[i] * L[i];
        int nl = clampi(round_even(x[i] * sl2 / slx), -nmax, nmax - 1);
        if (nl != L[i]) {
          slx += w * x[i] * nl;
          sl2 += w * nl * nl;
          if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<int8_t>(nl);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (!changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return sumlx / suml2;
}

// Non-negative codes l in [0, nmax] for the super-block's sub-scales under an imatrix:
// the best of 9 inverse scales, then coordinate descent on sum w (x - s*l)^2.
float fit_positive(int n, int nmax, const float* x, uint8_t* L, const float* qw) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = max > x[i] ? max : x[i];
  if (max < EPS) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = nmax / max;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(round_even(iscale * x[i]));
  const float scale = 1 / iscale;
  float best = 0;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * L[i];
    best += qw[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const float iscale_is = (0.1f * is + nmax) / max;
    const float scale_is = 1 / iscale_is;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      int l = round_even(iscale_is * x[i]);
      l = l < nmax ? l : nmax;
      const float diff = x[i] - scale_is * l;
      mse += qw[i] * diff * diff;
    }
    if (mse < best) {
      best = mse;
      iscale = iscale_is;
    }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = round_even(iscale * x[i]);
    l = l < nmax ? l : nmax;
    L[i] = static_cast<uint8_t>(l);
    sumlx += qw[i] * x[i] * l;
    suml2 += qw[i] * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = qw[i];
      float slx = sumlx - w * x[i] * L[i];
      float sl2 = suml2 - w * L[i] * L[i];
      if (slx > 0 && sl2 > 0) {
        int nl = round_even(x[i] * sl2 / slx);
        nl = nl < nmax ? nl : nmax;
        if (nl != L[i]) {
          slx += w * x[i] * nl;
          sl2 += w * nl * nl;
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<uint8_t>(nl);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (!changed) break;
  }
  return sumlx / suml2;
}

// ---------------------------------------------------------------- block writers

// Q2_K: {uint8 scales[16] (4-bit scale | 4-bit min << 4), uint8 qs[64], f16 d, f16 dmin}.
void q2_k_block(const float* x, const float* qw, uint8_t* y) {
  uint8_t L[QK], Laux[16], Ls[16], Lm[16];
  float weights[16], mins[16], scales[16], sw[16];
  uint8_t* sc = y;
  uint8_t* qs = y + 16;
  float d, dmin;
  if (!qw) {
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * j + l]);
      scales[j] = fit_affine(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.5f, 0.1f, 15, true);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    if (max_scale > 0) {
      const float iscale = 15.f / max_scale;
      for (int j = 0; j < 16; ++j) sc[j] = static_cast<uint8_t>(round_even(iscale * scales[j]));
      d = max_scale / 15.f;
    } else {
      for (int j = 0; j < 16; ++j) sc[j] = 0;
      d = 0;
    }
    if (max_min > 0) {
      const float iscale = 15.f / max_min;
      for (int j = 0; j < 16; ++j) sc[j] |= static_cast<uint8_t>(round_even(iscale * mins[j]) << 4);
      dmin = max_min / 15.f;
    } else {
      dmin = 0;
    }
  } else {
    float sumx2 = 0;
    for (int j = 0; j < QK; ++j) sumx2 += x[j] * x[j];
    const float sigma2 = sumx2 / QK;
    for (int j = 0; j < 16; ++j) {
      const float* w = qw + 16 * j;
      for (int l = 0; l < 16; ++l) weights[l] = w[l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
      float sumw = 0;
      for (int l = 0; l < 16; ++l) sumw += weights[l];
      sw[j] = sumw;
      scales[j] = fit_affine(16, 3, x + 16 * j, weights, L + 16 * j, &mins[j], Laux, -0.9f, 0.05f, 36, false);
    }
    d = fit_positive(16, 15, scales, Ls, sw);
    dmin = fit_positive(16, 15, mins, Lm, sw);
    for (int j = 0; j < 16; ++j) sc[j] = static_cast<uint8_t>(Ls[j] | (Lm[j] << 4));
  }
  put_half(y + 80, d);
  put_half(y + 82, dmin);
  const float dh = rt_half(d), mh = rt_half(dmin);
  for (int j = 0; j < 16; ++j) {
    const float dd = dh * (sc[j] & 0xF);
    if (!dd) continue;
    const float dm = mh * (sc[j] >> 4);
    for (int ii = 0; ii < 16; ++ii) L[16 * j + ii] = static_cast<uint8_t>(clampi(round_even((x[16 * j + ii] + dm) / dd), 0, 3));
  }
  for (int j = 0; j < QK; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

// Q3_K: {uint8 hmask[32], uint8 qs[64], uint8 scales[12] (16 6-bit scales), f16 d}.
void q3_k_block(const float* x, const float* qw, uint8_t* y) {
  int8_t L[QK], Ls[16];
  float scales[16], weight[16], sw[16];
  uint8_t* hmask = y;
  uint8_t* qs = y + 32;
  uint8_t* sc = y + 96;
  std::memset(sc, 0, 12);
  float d;
  if (!qw) {
    float max_scale = 0, amax = 0;
    for (int j = 0; j < 16; ++j) {
      scales[j] = fit_q3(16, 4, x + 16 * j, L + 16 * j);
      const float s = std::fabs(scales[j]);
      if (s > amax) { amax = s; max_scale = scales[j]; }
    }
    if (max_scale) {
      const float iscale = -32.f / max_scale;
      for (int j = 0; j < 16; ++j) {
        int l = clampi(round_even(iscale * scales[j]), -32, 31) + 32;
        if (j < 8) sc[j] = static_cast<uint8_t>(l & 0xF); else sc[j - 8] |= static_cast<uint8_t>((l & 0xF) << 4);
        l >>= 4;
        sc[j % 4 + 8] |= static_cast<uint8_t>(l << (2 * (j / 4)));
      }
      d = 1 / iscale;
    } else {
      d = 0;
    }
  } else {
    float sumx2 = 0;
    for (int j = 0; j < QK; ++j) sumx2 += x[j] * x[j];
    const float sigma2 = 2 * sumx2 / QK;
    for (int j = 0; j < 16; ++j) {
      const float* w = qw + 16 * j;
      for (int l = 0; l < 16; ++l) weight[l] = w[l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
      float sumw = 0;
      for (int l = 0; l < 16; ++l) sumw += weight[l];
      sw[j] = sumw;
      scales[j] = fit_symmetric(16, 4, x + 16 * j, L + 16 * j, weight);
    }
    d = fit_symmetric(16, 32, scales, Ls, sw);
    for (int j = 0; j < 16; ++j) {
      int l = Ls[j];
      if (j < 8) sc[j] = static_cast<uint8_t>(l & 0xF); else sc[j - 8] |= static_cast<uint8_t>((l & 0xF) << 4);
      l >>= 4;
      sc[j % 4 + 8] |= static_cast<uint8_t>(l << (2 * (j / 4)));
    }
  }
  put_half(y + 108, d);
  const float dh = rt_half(d);
  for (int j = 0; j < 16; ++j) {
    int s = j < 8 ? (sc[j] & 0xF) : (sc[j - 8] >> 4);
    s = (s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
    const float dd = dh * s;
    if (!dd) continue;
    for (int ii = 0; ii < 16; ++ii) L[16 * j + ii] = static_cast<int8_t>(clampi(round_even(x[16 * j + ii] / dd), -4, 3) + 4);
  }
  std::memset(hmask, 0, 32);
  int m = 0;
  uint8_t hm = 1;
  for (int j = 0; j < QK; ++j) {
    if (L[j] > 3) { hmask[m] |= hm; L[j] -= 4; }
    if (++m == 32) { m = 0; hm <<= 1; }
  }
  for (int j = 0; j < QK; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
}

// The 12-byte packing of 8 6-bit scales and 8 6-bit mins (Q4_K, Q5_K).
void pack_scale_min(const uint8_t* ls, const uint8_t* lm, uint8_t* s) {
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      s[j] = ls[j];
      s[j + 4] = lm[j];
    } else {
      s[j + 4] = static_cast<uint8_t>((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
      s[j - 4] |= static_cast<uint8_t>((ls[j] >> 4) << 6);
      s[j] |= static_cast<uint8_t>((lm[j] >> 4) << 6);
    }
  }
}

inline void scale_min(int j, const uint8_t* q, int* d, int* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Shared by Q4_K ({f16 d, f16 dmin, scales[12], qs[128]}) and Q5_K (the same plus qh[32]
// before qs): 8 sub-blocks of 32 with 6-bit scales and mins. L receives codes 0..nmax.
void k_affine_block(const float* x, const float* qw, int nmax, uint8_t* y, uint8_t* L) {
  uint8_t Laux[32], Ls[8], Lm[8];
  float weights[32], mins[8], scales[8], sw[8];
  float d, dmin;
  if (!qw) {
    // Lane j holds sub-block j: xt[i][j] = x[32 j + i].
    v8f xt[32], wt[32];
    v8i Lv[32];
    for (int i = 0; i < 32; ++i)
      for (int j = 0; j < 8; ++j) xt[i][j] = x[32 * j + i];
    v8f s2 = xt[0] * xt[0];
    for (int i = 1; i < 32; ++i) s2 += xt[i] * xt[i];
    v8f av;
    for (int j = 0; j < 8; ++j) av[j] = std::sqrt(s2[j] / 32);
    for (int i = 0; i < 32; ++i) wt[i] = av + float_of(bits_of(xt[i]) & 0x7fffffff);
    v8f vmin, vscale;
    if (nmax == 15) fit_affine_v8(15, xt, wt, Lv, &vmin, &vscale, -1.f, 0.1f, 20);
    else fit_affine_v8(31, xt, wt, Lv, &vmin, &vscale, -0.5f, 0.1f, 15);
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      scales[j] = vscale[j];
      mins[j] = vmin[j];
      for (int i = 0; i < 32; ++i) L[32 * j + i] = static_cast<uint8_t>(Lv[i][j]);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
      Ls[j] = static_cast<uint8_t>(std::min(63, round_even(inv_scale * scales[j])));
      Lm[j] = static_cast<uint8_t>(std::min(63, round_even(inv_min * mins[j])));
    }
    d = max_scale / 63.f;
    dmin = max_min / 63.f;
  } else {
    float sum_x2 = 0;
    for (int l = 0; l < QK; ++l) sum_x2 += x[l] * x[l];
    const float sigma2 = 2 * sum_x2 / QK;
    for (int j = 0; j < 8; ++j) {
      const float* w = qw + 32 * j;
      for (int l = 0; l < 32; ++l) weights[l] = w[l] * std::sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]);
      float sumw = 0;
      for (int l = 0; l < 32; ++l) sumw += weights[l];
      sw[j] = sumw;
      scales[j] = fit_affine(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux, -0.9f, 0.05f, 36, false);
    }
    d = fit_positive(8, 63, scales, Ls, sw);
    dmin = fit_positive(8, 63, mins, Lm, sw);
  }
  uint8_t* s = y + 4;
  std::memset(s, 0, 12);
  pack_scale_min(Ls, Lm, s);
  put_half(y, d);
  put_half(y + 2, dmin);
  const float dh = rt_half(d), mh = rt_half(dmin);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    scale_min(j, s, &sc, &m);
    const float dd = dh * sc;
    if (!dd) continue;
    const float dm = mh * m;
    for (int ii = 0; ii < 32; ++ii) L[32 * j + ii] = static_cast<uint8_t>(clampi(round_even((x[32 * j + ii] + dm) / dd), 0, nmax));
  }
}

void q4_k_block(const float* x, const float* qw, uint8_t* y) {
  uint8_t L[QK];
  k_affine_block(x, qw, 15, y, L);
  uint8_t* q = y + 16;
  for (int j = 0; j < QK; j += 64) {
    for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
    q += 32;
  }
}

void q5_k_block(const float* x, const float* qw, uint8_t* y) {
  uint8_t L[QK];
  k_affine_block(x, qw, 31, y, L);
  uint8_t* qh = y + 16;
  uint8_t* ql = y + 48;
  std::memset(qh, 0, 32);
  uint8_t m1 = 1, m2 = 2;
  for (int n = 0; n < QK; n += 64) {
    for (int j = 0; j < 32; ++j) {
      int l1 = L[n + j];
      if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
      int l2 = L[n + j + 32];
      if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
      ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
    }
    m1 = static_cast<uint8_t>(m1 << 2);
    m2 = static_cast<uint8_t>(m2 << 2);
    ql += 32;
  }
}

// Q6_K: {uint8 ql[128], uint8 qh[64], int8 scales[16], f16 d}.
void q6_k_block(const float* x, const float* qw, uint8_t* y) {
  int8_t L[QK];
  float scales[16];
  float max_scale = 0, max_abs = 0;
  if (qw) {
    // With an imatrix the weights are its values alone (no sigma2 term, unlike the other
    // K-quants).
    for (int ib = 0; ib < 16; ++ib) scales[ib] = fit_symmetric(16, 32, x + 16 * ib, L + 16 * ib, qw + 16 * ib);
  } else {
    for (int half = 0; half < 2; ++half) {   // sub-blocks 8 half .. 8 half + 7 in the lanes
      v8f xt[16], sc;
      v8i Lv[16];
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) xt[i][j] = x[16 * (8 * half + j) + i];
      fit_symmetric_v8(32, xt, Lv, &sc);
      for (int j = 0; j < 8; ++j) {
        scales[8 * half + j] = sc[j];
        for (int i = 0; i < 16; ++i) L[16 * (8 * half + j) + i] = static_cast<int8_t>(Lv[i][j]);
      }
    }
  }
  for (int ib = 0; ib < 16; ++ib) {
    const float a = std::fabs(scales[ib]);
    if (a > max_abs) { max_abs = a; max_scale = scales[ib]; }
  }
  uint8_t* ql = y;
  uint8_t* qh = y + 128;
  int8_t* sc = reinterpret_cast<int8_t*>(y + 192);
  if (max_abs < EPS) {
    std::memset(y, 0, 210);
    return;
  }
  const float iscale = -128.f / max_scale;
  put_half(y + 208, 1 / iscale);
  for (int ib = 0; ib < 16; ++ib) sc[ib] = static_cast<int8_t>(std::min(127, round_even(iscale * scales[ib])));
  const float dh = rt_half(1 / iscale);
  for (int j = 0; j < 16; ++j) {
    const float d = dh * sc[j];
    if (!d) continue;
    for (int ii = 0; ii < 16; ++ii) L[16 * j + ii] = static_cast<int8_t>(clampi(round_even(x[16 * j + ii] / d), -32, 31) + 32);
  }
  for (int j = 0; j < QK; j += 128) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF, q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
      ql[l] = static_cast<uint8_t>(q1 | (q3 << 4));
      ql[l + 32] = static_cast<uint8_t>(q2 | (q4 << 4));
      qh[l] = static_cast<uint8_t>((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                   ((L[j + l + 96] >> 4) << 6));
    }
    ql += 64;
    qh += 32;
  }
}

// Q8_K: {f32 d, int8 qs[256], int16 bsums[16]}.
void q8_k_block(const float* x, const float*, uint8_t* y) {
  float max = 0, amax = 0;
  for (int j = 0; j < QK; ++j) {
    const float ax = std::fabs(x[j]);
    if (ax > amax) { amax = ax; max = x[j]; }
  }
  int8_t* qs = reinterpret_cast<int8_t*>(y + 4);
  if (!amax) {
    std::memset(y, 0, 292);
    return;
  }
  const float iscale = -127.f / max;
  for (int j = 0; j < QK; ++j) qs[j] = static_cast<int8_t>(std::min(127, round_even(iscale * x[j])));
  for (int j = 0; j < 16; ++j) {
    int16_t s = 0;
    for (int ii = 0; ii < 16; ++ii) s = static_cast<int16_t>(s + qs[j * 16 + ii]);
    std::memcpy(y + 260 + 2 * j, &s, 2);
  }
  const float d = 1 / iscale;
  std::memcpy(y, &d, 4);
}

// The 32-element formats with an importance matrix (without one the torch quantizers,
// bit-exact with gguf-py, serve). sigma2 is per row.
void q4_0_block(const float* x, const float* qw, float sigma2, uint8_t* y) {
  float weight[32];
  int8_t L[32];
  for (int j = 0; j < 32; ++j) weight[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
  const float d = fit_symmetric(32, 8, x, L, weight);
  put_half(y, d);
  for (int j = 0; j < 16; ++j) y[2 + j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
}

void q5_0_block(const float* x, const float* qw, float sigma2, uint8_t* y) {
  float weight[32];
  int8_t L[32];
  for (int j = 0; j < 32; ++j) weight[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
  const float d = fit_symmetric(32, 16, x, L, weight);
  put_half(y, d);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const uint8_t x0 = static_cast<uint8_t>(L[j]), x1 = static_cast<uint8_t>(L[j + 16]);
    y[6 + j] = static_cast<uint8_t>((x0 & 0x0F) | ((x1 & 0x0F) << 4));
    qh |= ((x0 & 0x10u) >> 4) << (j + 0);
    qh |= ((x1 & 0x10u) >> 4) << (j + 16);
  }
  std::memcpy(y + 2, &qh, 4);
}

void q4_1_block(const float* x, const float* qw, float sigma2, uint8_t* y) {
  float weight[32];
  uint8_t L[32], Laux[32];
  for (int j = 0; j < 32; ++j) weight[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
  float min;
  const float d = fit_affine(32, 15, x, weight, L, &min, Laux, -0.9f, 0.05f, 36, false);
  put_half(y, d);
  put_half(y + 2, -min);
  for (int j = 0; j < 16; ++j) y[4 + j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
}

void q5_1_block(const float* x, const float* qw, float sigma2, uint8_t* y) {
  float weight[32];
  uint8_t L[32], Laux[32];
  for (int j = 0; j < 32; ++j) weight[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
  float min;
  const float d = fit_affine(32, 31, x, weight, L, &min, Laux, -0.9f, 0.05f, 36, false);
  put_half(y, d);
  put_half(y + 2, -min);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const uint8_t x0 = L[j], x1 = L[j + 16];
    y[8 + j] = static_cast<uint8_t>((x0 & 0x0F) | ((x1 & 0x0F) << 4));
    qh |= ((x0 & 0x10u) >> 4) << (j + 0);
    qh |= ((x1 & 0x10u) >> 4) << (j + 16);
  }
  std::memcpy(y + 4, &qh, 4);
}

// The 32-element formats without an imatrix, and MXFP4 (llama.cpp's reference quantizers;
// gguf-py's agree for the first five).
inline float signed_absmax(const float* x, int n) {
  float amax = 0, max = 0;
  for (int j = 0; j < n; ++j) {
    const float v = x[j];
    if (amax < std::fabs(v)) { amax = std::fabs(v); max = v; }
  }
  return max;
}

inline void min_max(const float* x, int n, float* mn, float* mx) {
  float lo = 3.402823466e+38f, hi = -3.402823466e+38f;
  for (int j = 0; j < n; ++j) {
    if (x[j] < lo) lo = x[j];
    if (x[j] > hi) hi = x[j];
  }
  *mn = lo;
  *mx = hi;
}

void q4_0_plain(const float* x, const float*, uint8_t* y) {
  const float d = signed_absmax(x, 32) / -8;
  const float id = d ? 1.0f / d : 0.0f;
  put_half(y, d);
  for (int j = 0; j < 16; ++j) {
    const int a = std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f)));
    const int b = std::min(15, static_cast<int>(static_cast<int8_t>(x[16 + j] * id + 8.5f)));
    y[2 + j] = static_cast<uint8_t>(a | (b << 4));
  }
}

void q4_1_plain(const float* x, const float*, uint8_t* y) {
  float mn, mx;
  min_max(x, 32, &mn, &mx);
  const float d = (mx - mn) / 15;
  const float id = d ? 1.0f / d : 0.0f;
  put_half(y, d);
  put_half(y + 2, mn);
  for (int j = 0; j < 16; ++j) {
    const int a = std::min(15, static_cast<int>(static_cast<int8_t>((x[j] - mn) * id + 0.5f)));
    const int b = std::min(15, static_cast<int>(static_cast<int8_t>((x[16 + j] - mn) * id + 0.5f)));
    y[4 + j] = static_cast<uint8_t>(a | (b << 4));
  }
}

void pack5(const int* q, uint8_t* qh_at, uint8_t* qs) {
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const uint32_t a = static_cast<uint32_t>(q[j]), b = static_cast<uint32_t>(q[16 + j]);
    qs[j] = static_cast<uint8_t>((a & 0x0F) | ((b & 0x0F) << 4));
    qh |= ((a & 0x10u) >> 4) << j;
    qh |= ((b & 0x10u) >> 4) << (j + 16);
  }
  std::memcpy(qh_at, &qh, 4);
}

void q5_0_plain(const float* x, const float*, uint8_t* y) {
  const float d = signed_absmax(x, 32) / -16;
  const float id = d ? 1.0f / d : 0.0f;
  put_half(y, d);
  int q[32];
  for (int j = 0; j < 32; ++j) q[j] = std::min(31, static_cast<int>(static_cast<int8_t>(x[j] * id + 16.5f)));
  pack5(q, y + 2, y + 6);
}

void q5_1_plain(const float* x, const float*, uint8_t* y) {
  float mn, mx;
  min_max(x, 32, &mn, &mx);
  const float d = (mx - mn) / 31;
  const float id = d ? 1.0f / d : 0.0f;
  put_half(y, d);
  put_half(y + 2, mn);
  int q[32];
  for (int j = 0; j < 32; ++j) q[j] = static_cast<uint8_t>((x[j] - mn) * id + 0.5f);
  pack5(q, y + 4, y + 8);
}

void q8_0_plain(const float* x, const float*, uint8_t* y) {
  float amax = 0;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127;
  const float id = d ? 1.0f / d : 0.0f;
  put_half(y, d);
  for (int j = 0; j < 32; ++j) y[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[j] * id)));
}

void q8_1_plain(const float* x, const float*, uint8_t* y) {
  float amax = 0;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127;
  const float id = d ? 1.0f / d : 0.0f;
  put_half(y, d);
  int sum = 0;
  for (int j = 0; j < 32; ++j) {
    const int8_t q = static_cast<int8_t>(std::round(x[j] * id));
    y[4 + j] = static_cast<uint8_t>(q);
    sum += q;
  }
  put_half(y + 2, sum * d);
}

// e2m1 code values, doubled (so they are integers).
constexpr int8_t kMxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

void mxfp4_plain(const float* x, const float*, uint8_t* y) {
  float amax = 0;
  for (int j = 0; j < 32; ++j)
    if (amax < std::fabs(x[j])) amax = std::fabs(x[j]);
  const uint8_t e = amax > 0.0f ? static_cast<uint8_t>(std::floor(std::log2(amax)) - 2 + 127) : 0;
  // Half the e8m0 value 2^(e-127), built from its bits.
  const uint32_t bits = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float d;
  std::memcpy(&d, &bits, 4);
  y[0] = e;
  auto best = [&](float v) {
    int bi = 0;
    float be = std::fabs(kMxfp4[0] * d - v);
    for (int i = 1; i < 16; ++i) {
      const float err = std::fabs(kMxfp4[i] * d - v);
      if (err < be) { bi = i; be = err; }
    }
    return bi;
  };
  for (int j = 0; j < 16; ++j) y[1 + j] = static_cast<uint8_t>(best(x[j]) | (best(x[16 + j]) << 4));
}

using KBlock = void (*)(const float*, const float*, uint8_t*);
using LBlock = void (*)(const float*, const float*, float, uint8_t*);

bool k_block(int type, KBlock* f, int* bytes) {
  switch (type) {
    case 10: *f = q2_k_block; *bytes = 84; return true;
    case 11: *f = q3_k_block; *bytes = 110; return true;
    case 12: *f = q4_k_block; *bytes = 144; return true;
    case 13: *f = q5_k_block; *bytes = 176; return true;
    case 14: *f = q6_k_block; *bytes = 210; return true;
    case 15: *f = q8_k_block; *bytes = 292; return true;
    default: return false;
  }
}

bool plain_block(int type, KBlock* f, int* bytes) {
  switch (type) {
    case 2: *f = q4_0_plain; *bytes = 18; return true;
    case 3: *f = q4_1_plain; *bytes = 20; return true;
    case 6: *f = q5_0_plain; *bytes = 22; return true;
    case 7: *f = q5_1_plain; *bytes = 24; return true;
    case 8: *f = q8_0_plain; *bytes = 34; return true;
    case 9: *f = q8_1_plain; *bytes = 36; return true;
    case 39: *f = mxfp4_plain; *bytes = 17; return true;
    default: return false;
  }
}

bool legacy_block(int type, LBlock* f, int* bytes) {
  switch (type) {
    case 2: *f = q4_0_block; *bytes = 18; return true;
    case 3: *f = q4_1_block; *bytes = 20; return true;
    case 6: *f = q5_0_block; *bytes = 22; return true;
    case 7: *f = q5_1_block; *bytes = 24; return true;
    default: return false;
  }
}

}  // namespace

extern "C" {

// Quantize x [nrows, ncols] (float32, rows contiguous) to ggml type `type` into out
// (nrows * bytes-per-row). imatrix: ncols importance weights shared by every row, or
// null (the K-quants and Q4_0/Q4_1/Q5_0/Q5_1 use it; Q8_0/Q8_1/MXFP4 ignore it, as
// llama.cpp does). Returns 0, 1 for an unsupported type or 2 for a row length that is not
// a whole number of blocks.
int mq_quantize(int type, const float* x, const float* imatrix, int64_t nrows, int64_t ncols, uint8_t* out) {
  KBlock kf = nullptr;
  LBlock lf = nullptr;
  int bytes = 0, block = 0;
  if (k_block(type, &kf, &bytes)) {
    block = QK;
  } else if (imatrix && legacy_block(type, &lf, &bytes)) {
    block = 32;
  } else if (plain_block(type, &kf, &bytes)) {
    block = 32;
    imatrix = nullptr;
  } else {
    return 1;
  }
  if (ncols % block) return 2;
  const int64_t nb = ncols / block, row_bytes = nb * bytes;
  mq::parallel_for(nrows, mq::grain_rows(ncols * 64), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * ncols;
      uint8_t* yr = out + r * row_bytes;
      if (kf) {
        for (int64_t b = 0; b < nb; ++b) kf(xr + b * block, imatrix ? imatrix + b * block : nullptr, yr + b * bytes);
      } else {
        float sum_x2 = 0;
        for (int64_t j = 0; j < ncols; ++j) sum_x2 += xr[j] * xr[j];
        const float sigma2 = sum_x2 / ncols;
        for (int64_t b = 0; b < nb; ++b) lf(xr + b * 32, imatrix + b * 32, sigma2, yr + b * bytes);
      }
    }
  });
  return 0;
}

}  // extern "C"
