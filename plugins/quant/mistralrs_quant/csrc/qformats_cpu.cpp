// C entry points and portable kernels for the F8Q8 / FP8 / HQQ formats (see qformats.h).
//
// A call decodes a tile of weight rows (about 32 KiB of float32, so it stays in L1/L2)
// and multiplies it into the outputs before decoding the next: the weight's codes are
// streamed once per call and no dense copy is ever materialised, which is where the torch
// paths (dequantize the whole weight, then F.linear) spend their time.
#include <cmath>
#include <cstring>
#include <vector>

#include "ggml_kernels.h"
#include "mq_parallel.h"
#include "qformats.h"

namespace mq {

float fp8_table[256];

namespace {

float fp8_e4m3fn_value(int b) {
  const int e = (b >> 3) & 15, m = b & 7;
  float v;
  if (e == 15 && m == 7) v = NAN;
  else if (e == 0) v = std::ldexp(static_cast<float>(m), -9);
  else v = std::ldexp(static_cast<float>(8 + m), e - 10);
  return (b & 0x80) ? -v : v;
}

struct Fp8TableInit {
  Fp8TableInit() {
    for (int b = 0; b < 256; ++b) fp8_table[b] = fp8_e4m3fn_value(b);
  }
};
const Fp8TableInit fp8_table_init;

// Without hardware FMA: q s is exact in double, and so is the sum unless the two terms lie
// ~20 binades apart, so one rounding to float gives the fused result (a software fma()
// would cost ~20x more here).
#define MQ_FMA_Q_S_Z(q, s, z) static_cast<float>(static_cast<double>(q) * (s) + (z))
#include "qformats_generic.h"

}  // namespace

void fmt_decode_rows_scalar(const FmtWeight& f, int64_t n0, int64_t n1, float* out) {
  generic_decode_rows(f, n0, n1, out);
}

void fmt_dot_tile_scalar(const float* x, int64_t M, int64_t K, const float* tile, int64_t rows, float* y,
                         int64_t ldy) {
  generic_dot_tile(x, M, K, tile, rows, y, ldy);
}

}  // namespace mq

namespace {

enum Status : int { OK = 0, BAD_KIND = 1, BAD_IMPL = 2, NO_ISA = 3, FAILED = 5 };

enum Variant : int { AUTO = 0, SCALAR = 1, AVX512 = 2, AVX2 = 4 };

bool have_avx2() {
#ifdef MQ_HAVE_FMT_AVX512
  static const bool ok = mq::cpu_has_avx2_fma();
  return ok;
#else
  return false;
#endif
}

// The variant to run: AUTO is the widest this CPU has.
int resolve_variant(int impl, int* out) {
  const bool avx512 = mq::use_avx512_kernels();
  if (impl == AUTO) impl = avx512 ? AVX512 : have_avx2() ? AVX2 : SCALAR;
  if (impl != SCALAR && impl != AVX512 && impl != AVX2) return BAD_IMPL;
  if ((impl == AVX512 && !avx512) || (impl == AVX2 && !have_avx2())) return NO_ISA;
  *out = impl;
  return OK;
}

bool valid(const mq::FmtWeight& f) {
  switch (f.kind) {
    case mq::FMT_F8Q8: return f.K % 32 == 0;
    case mq::FMT_FP8: return true;
    case mq::FMT_FP8_BLOCK: return f.br > 0 && f.bc > 0;
    case mq::FMT_HQQ4: return f.br > 0 && f.br % 2 == 0 && (f.N * f.K) % f.br == 0;
    case mq::FMT_HQQ8: return f.br > 0 && (f.N * f.K) % f.br == 0;
    default: return false;
  }
}

void decode(const mq::FmtWeight& f, int variant, int64_t n0, int64_t n1, float* out) {
#ifdef MQ_HAVE_FMT_AVX512
  if (variant == AVX512) return mq::fmt_decode_rows_avx512(f, n0, n1, out);
  if (variant == AVX2) return mq::fmt_decode_rows_avx2(f, n0, n1, out);
#endif
  (void)variant;
  mq::fmt_decode_rows_scalar(f, n0, n1, out);
}

void dot_tile(int variant, const float* x, int64_t M, int64_t K, const float* tile, int64_t rows, float* y,
              int64_t ldy) {
#ifdef MQ_HAVE_FMT_AVX512
  if (variant == AVX512) return mq::fmt_dot_tile_avx512(x, M, K, tile, rows, y, ldy);
  if (variant == AVX2) return mq::fmt_dot_tile_avx2(x, M, K, tile, rows, y, ldy);
#endif
  (void)variant;
  mq::fmt_dot_tile_scalar(x, M, K, tile, rows, y, ldy);
}

// Weight rows per decoded tile: ~32 KiB of float32.
int64_t tile_rows(int64_t K) {
  const int64_t r = 8192 / (K > 0 ? K : 1);
  return r > 0 ? r : 1;
}

}  // namespace

extern "C" {

// Bit 0: the AVX-512 format kernels can run here; bit 1: the AVX2/FMA ones.
int mq_fmt_isa() { return (mq::use_avx512_kernels() ? 1 : 0) | (have_avx2() ? 2 : 0); }

// y[M, N] = x[M, K] @ W.T (float32, x and y contiguous) for a bound weight.
int mq_fmt_matmul(const mq::FmtWeight* f, const float* x, int64_t M, float* y) {
  int variant = SCALAR;
  if (!valid(*f)) return BAD_KIND;
  if (int st = resolve_variant(f->impl, &variant)) return st;
  const int64_t N = f->N, K = f->K, tr = tile_rows(K);
  try {
    // A task decodes its rows' codes once (~K work per row) and does M K multiply-adds.
#ifdef MQ_HAVE_FMT_AVX512
    if (variant == AVX512 && mq::fmt_direct_avx512_supports(*f, M)) {
      mq::parallel_for(N, mq::grain_rows(K * (M + 2)), [&](int64_t b, int64_t e) {
        mq::fmt_matmul_direct_avx512(*f, x, M, y, b, e);
        if (f->kind == mq::FMT_FP8)
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = b; n < e; ++n) y[m * N + n] *= f->tensor_scale;
      });
      return OK;
    }
#endif
    mq::parallel_for(N, mq::grain_rows(K * (M + 2)), [&](int64_t b, int64_t e) {
      static thread_local std::vector<float> buf;
      buf.resize(static_cast<size_t>(tr * K));
      for (int64_t n0 = b; n0 < e; n0 += tr) {
        const int64_t n1 = n0 + tr < e ? n0 + tr : e;
        decode(*f, variant, n0, n1, buf.data());
        dot_tile(variant, x, M, K, buf.data(), n1 - n0, y + n0, N);
      }
      if (f->kind == mq::FMT_FP8) {  // torch's order: the product, then the scale
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = b; n < e; ++n) y[m * N + n] *= f->tensor_scale;
      }
    });
  } catch (...) {
    return FAILED;
  }
  return OK;
}

// Rows [n0, n1) of W into out [(n1 - n0), K]: float32, or bfloat16 (round to nearest even)
// when bf16. FMT_FP8 gives the unscaled codes' values (see qformats.h).
int mq_fmt_dequantize(const mq::FmtWeight* f, int64_t n0, int64_t n1, void* out, int bf16) {
  int variant = SCALAR;
  if (!valid(*f)) return BAD_KIND;
  if (int st = resolve_variant(f->impl, &variant)) return st;
  const int64_t K = f->K, tr = tile_rows(K);
  try {
    mq::parallel_for(n1 - n0, mq::grain_rows(K * 4), [&](int64_t b, int64_t e) {
      if (!bf16) {
        decode(*f, variant, n0 + b, n0 + e, static_cast<float*>(out) + b * K);
        return;
      }
      static thread_local std::vector<float> buf;
      buf.resize(static_cast<size_t>(tr * K));
      for (int64_t r0 = b; r0 < e; r0 += tr) {
        const int64_t r1 = r0 + tr < e ? r0 + tr : e;
        decode(*f, variant, n0 + r0, n0 + r1, buf.data());
        uint16_t* o = static_cast<uint16_t*>(out) + r0 * K;
        int64_t i = 0;
        const int64_t cnt = (r1 - r0) * K;
#ifdef MQ_HAVE_FMT_AVX512
        if (variant == AVX512) {
          mq::f32_to_bf16_avx512(buf.data(), cnt / 16 * 16, o);
          i = cnt / 16 * 16;
        }
#endif
        for (; i < cnt; ++i) {
          uint32_t v;
          std::memcpy(&v, buf.data() + i, 4);
          const bool nan = (v & 0x7FFFFFFFu) > 0x7F800000u;
          o[i] = static_cast<uint16_t>(nan ? (v >> 16) | 0x40 : (v + 0x7FFFu + ((v >> 16) & 1)) >> 16);
        }
      }
    });
  } catch (...) {
    return FAILED;
  }
  return OK;
}

}  // extern "C"
