// Dispatch, scalar kernel and C ABI of the small-M dense matmul (dense_small_m.h).
#include "dense_small_m.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include "mq_parallel.h"

namespace mq_dense {

static float to_f32(uint16_t h, bool f16) {
  if (f16) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return static_cast<float>(v);
  }
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static uint16_t from_f32(float f, bool f16) {
  uint16_t h;
  if (f16) {
    const _Float16 v = static_cast<_Float16>(f);  // round to nearest even
    std::memcpy(&h, &v, 2);
    return h;
  }
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

void tile_scalar(const Args& a, int64_t n0, int64_t n1, float* buf) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = a.w + n * a.sw;
    for (int64_t m = 0; m < a.m; ++m) {
      const float* x = a.xf + m * a.kp;
      float s = 0.f;
      for (int64_t k = 0; k < a.k; ++k) s += to_f32(w[k], a.f16) * x[k];
      buf[m * TILE_STRIDE + (n - n0)] = s;
    }
  }
  for (int64_t m = 0; m < a.m; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float v = buf[m * TILE_STRIDE + (n - n0)];
      if (a.bias) v += to_f32(a.bias[n], a.f16);
      if (a.act == 1) {
        const float u = 0.7978845608028654f * v * (1.f + 0.044715f * v * v);
        v = v / (1.f + std::exp(-2.f * u));
      }
      if (a.other) v += to_f32(a.other[m * a.so + n], a.f16);
      a.y[m * a.sy + n] = from_f32(v, a.f16);
    }
}

}  // namespace mq_dense

namespace {

enum Impl : int { AUTO = 0, SCALAR = 1, AVX512 = 2, AVX512BF16 = 3, AMX = 4 };
enum Status : int { OK = 0, BAD_TYPE = 1, BAD_IMPL = 2, NO_ISA = 3, FAILED = 5 };

bool have_avx512() {
#ifdef MQ_DENSE_X86
  // GCC/clang check that the OS enables the zmm state (XGETBV) before reporting avx512*.
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

bool have_avx512bf16() {
#ifdef MQ_DENSE_X86
  static const bool ok = have_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool have_amx() {
#ifdef MQ_DENSE_AMX
  static const bool ok = [] {
    unsigned a, b, c, d;
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; then the OS's permission.
    if (!have_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    return ((d >> 22) & 1) && ((d >> 24) & 1) && mq_dense::amx_usable();
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace

extern "C" {

// Bit 0: the AVX-512F kernel can run here; bit 1: the AVX-512 BF16 one; bit 2: the AMX one.
int mq_dense_isa() { return (have_avx512() ? 1 : 0) | (have_avx512bf16() ? 2 : 0) | (have_amx() ? 4 : 0); }

// y[m, :n] = epilogue(x[m, :k] @ W.T) for bf16 (wtype 0) or f16 (wtype 1) tensors: x's row
// i at x + i * sx, W's row j at w + j * sw, other's at other + i * so, y's at y + i * sy;
// bias [n] and other may be null; act 0 (none) or 1 (gelu_tanh). impl: 0 the fastest this
// CPU has for m rows, 1 scalar, 2 AVX-512F, 3 AVX-512 BF16, 4 AMX (3 and 4: bf16 only).
int mq_dense_mm(int wtype, int impl, const uint16_t* x, int64_t m, int64_t k, int64_t sx, const uint16_t* w,
                int64_t n, int64_t sw, const uint16_t* bias, int act, const uint16_t* other, int64_t so,
                uint16_t* y, int64_t sy) {
  if (wtype != 0 && wtype != 1) return BAD_TYPE;
  if (act != 0 && act != 1) return BAD_TYPE;
  const bool f16 = wtype == 1;
  // bf16: vdpbf16ps is a little faster on 1-2 rows, the widening FMA kernel on 3, AMX
  // from 4 (where the others are bound by their multiply units); measured on a Sapphire
  // Rapids core (bench/dense_matmul.py).
  if (impl == AUTO) {
    if (!f16 && m <= 2 && have_avx512bf16())
      impl = AVX512BF16;
    else if (!f16 && m >= 4 && have_amx())
      impl = AMX;
    else
      impl = have_avx512() ? AVX512 : SCALAR;
  }
  if (impl != SCALAR && impl != AVX512 && impl != AVX512BF16 && impl != AMX) return BAD_IMPL;
  if ((impl == AVX512 && !have_avx512()) || (impl == AVX512BF16 && !have_avx512bf16()) ||
      (impl == AMX && !have_amx()))
    return NO_ISA;
  if ((impl == AVX512BF16 || impl == AMX) && f16) return BAD_TYPE;
  if (m <= 0 || n <= 0) return OK;
  try {
    // A contiguous, zero-padded copy of the few activation rows (the kernels then load
    // whole vectors past k): bf16 pairs for vdpbf16ps, float32 for the others.
    const int64_t kp = (k + 31) & ~int64_t(31);
    static thread_local std::vector<uint16_t> xh;
    static thread_local std::vector<float> xf;
    if (impl == AVX512BF16 || impl == AMX) {
      xh.assign(m * kp, 0);
      for (int64_t i = 0; i < m; ++i) std::memcpy(xh.data() + i * kp, x + i * sx, k * sizeof(uint16_t));
    } else {
      xf.assign(m * kp, 0.f);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < k; ++j) xf[i * kp + j] = mq_dense::to_f32(x[i * sx + j], f16);
    }
    const mq_dense::Args a{f16, m, k, kp, xh.data(), xf.data(), w, n, sw, bias, act, other, so, y, sy};
    static thread_local std::vector<uint32_t> xt;
#ifdef MQ_DENSE_AMX
    if (impl == AMX) {
      xt.resize(m * kp / 2);
      mq_dense::amx_pack_x(a, xt.data());
    }
#endif
    const uint32_t* xtp = xt.data();  // the workers' own thread_local xt is another vector
    const int64_t tiles = (n + mq_dense::TILE - 1) / mq_dense::TILE;
    const int64_t grain = (mq::grain_rows(k * m) + mq_dense::TILE - 1) / mq_dense::TILE;
    mq::parallel_for(tiles, grain, [&](int64_t b, int64_t e) {
      static thread_local std::vector<float> buf;
      buf.resize(m * mq_dense::TILE_STRIDE);
      for (int64_t t = b; t < e; ++t) {
        const int64_t n0 = t * mq_dense::TILE, n1 = std::min(n, n0 + mq_dense::TILE);
#ifdef MQ_DENSE_AMX
        if (impl == AMX) {
          mq_dense::tile_amx(a, xtp, n0, n1, buf.data());
          continue;
        }
#endif
#ifdef MQ_DENSE_X86
        if (impl == AVX512BF16) {
          mq_dense::tile_avx512bf16(a, n0, n1, buf.data());
          continue;
        }
        if (impl == AVX512) {
          mq_dense::tile_avx512(a, n0, n1, buf.data());
          continue;
        }
#endif
        mq_dense::tile_scalar(a, n0, n1, buf.data());
      }
    });
  } catch (...) {
    return FAILED;
  }
  return OK;
}

}  // extern "C"
