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

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace

void fmt_decode_rows_scalar(const FmtWeight& f, int64_t n0, int64_t n1, float* out) {
  const int64_t K = f.K;
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * K;
    switch (f.kind) {
      case FMT_F8Q8: {
        const uint8_t* row = f.w + n * (K / 32) * 33;
        for (int64_t b = 0; b < K / 32; ++b) {
          const uint8_t* blk = row + b * 33;
          // as the torch path: fp8 -> float32, / 448 in float32, times each code
          const float d = fp8_table[blk[0]] / 448.0f;
          for (int i = 0; i < 32; ++i) o[b * 32 + i] = static_cast<float>(static_cast<int8_t>(blk[1 + i])) * d;
        }
        break;
      }
      case FMT_FP8: {
        const uint8_t* row = f.w + n * K;
        for (int64_t k = 0; k < K; ++k) o[k] = fp8_table[row[k]];
        break;
      }
      case FMT_FP8_BLOCK: {
        const uint8_t* row = f.w + n * K;
        const int64_t nbc = (K + f.bc - 1) / f.bc;
        const float* s = f.scale + (n / f.br) * nbc;
        for (int64_t k = 0; k < K; ++k) o[k] = fp8_table[row[k]] * s[k / f.bc];
        break;
      }
      case FMT_HQQ4:
      case FMT_HQQ8: {
        // Element (n, k) is element f = n K + k of the flattened weight, which HQQ views as
        // [G, ncols]: group-view row r = f / ncols, column c = f % ncols (the group).
        const int64_t G = f.br, ncols = f.N * K / G, half = G / 2;
        for (int64_t k = 0; k < K;) {
          const int64_t flat = n * K + k, r = flat / ncols, c = flat % ncols;
          const int64_t len = min64(K - k, ncols - c);
          for (int64_t i = 0; i < len; ++i) {
            int q;
            if (f.kind == FMT_HQQ8) q = f.w[r * ncols + c + i];
            else q = r < half ? f.w[r * ncols + c + i] >> 4 : f.w[(r - half) * ncols + c + i] & 15;
            // q s + (-z s) rounded once, as the AVX-512 kernel's FMA and torch's addcmul on
            // AVX CPUs: q s is exact in double, and so is the sum unless the two terms lie
            // ~20 binades apart; a software fma() would cost ~20x more here.
            o[k + i] = static_cast<float>(static_cast<double>(q) * f.scale[c + i] + f.aux[c + i]);
          }
          k += len;
        }
        break;
      }
      default:
        break;
    }
  }
}

void fmt_dot_tile_scalar(const float* x, int64_t M, int64_t K, const float* tile, int64_t rows, float* y,
                         int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* w = tile + r * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int t = 0; t < 8; ++t) p[t] += xm[k + t] * w[k + t];
      for (; k < K; ++k) p[0] += xm[k] * w[k];
      y[m * ldy + r] = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    }
  }
}

}  // namespace mq

namespace {

enum Status : int { OK = 0, BAD_KIND = 1, BAD_IMPL = 2, NO_ISA = 3, FAILED = 5 };

int resolve_avx512(int impl, bool* avx512) {
  const bool have = mq::use_avx512_kernels();
  if (impl == 0) impl = have ? 2 : 1;
  if (impl != 1 && impl != 2) return BAD_IMPL;
  if (impl == 2 && !have) return NO_ISA;
  *avx512 = impl == 2;
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

void decode(const mq::FmtWeight& f, bool avx512, int64_t n0, int64_t n1, float* out) {
#ifdef MQ_HAVE_FMT_AVX512
  if (avx512) return mq::fmt_decode_rows_avx512(f, n0, n1, out);
#endif
  (void)avx512;
  mq::fmt_decode_rows_scalar(f, n0, n1, out);
}

// Weight rows per decoded tile: ~32 KiB of float32.
int64_t tile_rows(int64_t K) {
  const int64_t r = 8192 / (K > 0 ? K : 1);
  return r > 0 ? r : 1;
}

}  // namespace

extern "C" {

// y[M, N] = x[M, K] @ W.T (float32, x and y contiguous) for a bound weight.
int mq_fmt_matmul(const mq::FmtWeight* f, const float* x, int64_t M, float* y) {
  bool avx512 = false;
  if (!valid(*f)) return BAD_KIND;
  if (int st = resolve_avx512(f->impl, &avx512)) return st;
  const int64_t N = f->N, K = f->K, tr = tile_rows(K);
  try {
    // A task decodes its rows' codes once (~K work per row) and does M K multiply-adds.
    mq::parallel_for(N, mq::grain_rows(K * (M + 2)), [&](int64_t b, int64_t e) {
      static thread_local std::vector<float> buf;
      buf.resize(static_cast<size_t>(tr * K));
      for (int64_t n0 = b; n0 < e; n0 += tr) {
        const int64_t n1 = n0 + tr < e ? n0 + tr : e;
        decode(*f, avx512, n0, n1, buf.data());
#ifdef MQ_HAVE_FMT_AVX512
        if (avx512) {
          mq::fmt_dot_tile_avx512(x, M, K, buf.data(), n1 - n0, y + n0, N);
          continue;
        }
#endif
        mq::fmt_dot_tile_scalar(x, M, K, buf.data(), n1 - n0, y + n0, N);
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
  bool avx512 = false;
  if (!valid(*f)) return BAD_KIND;
  if (int st = resolve_avx512(f->impl, &avx512)) return st;
  const int64_t K = f->K, tr = tile_rows(K);
  try {
    mq::parallel_for(n1 - n0, mq::grain_rows(K * 4), [&](int64_t b, int64_t e) {
      if (!bf16) {
        decode(*f, avx512, n0 + b, n0 + e, static_cast<float*>(out) + b * K);
        return;
      }
      static thread_local std::vector<float> buf;
      buf.resize(static_cast<size_t>(tr * K));
      for (int64_t r0 = b; r0 < e; r0 += tr) {
        const int64_t r1 = r0 + tr < e ? r0 + tr : e;
        decode(*f, avx512, n0 + r0, n0 + r1, buf.data());
        uint16_t* o = static_cast<uint16_t*>(out) + r0 * K;
        int64_t i = 0;
        const int64_t cnt = (r1 - r0) * K;
#ifdef MQ_HAVE_FMT_AVX512
        if (avx512) {
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
