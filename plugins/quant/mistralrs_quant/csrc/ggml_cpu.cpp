// C entry points, CPU dispatch and the portable (scalar) kernels.
//
// This translation unit is compiled for the baseline ISA; the AVX-512 kernels are only
// called after a runtime check, so one build serves every CPU of the architecture.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ggml_kernels.h"
#include "mq_parallel.h"

namespace mq {

float f16_table[65536];

bool block_shape(int type, int* block, int* bytes) {
  switch (type) {
    case Q4_0: *block = 32; *bytes = 18; return true;
    case Q4_1: *block = 32; *bytes = 20; return true;
    case Q5_0: *block = 32; *bytes = 22; return true;
    case Q5_1: *block = 32; *bytes = 24; return true;
    case Q8_0: *block = 32; *bytes = 34; return true;
    case Q4_K: *block = 256; *bytes = 144; return true;
    case Q5_K: *block = 256; *bytes = 176; return true;
    case Q6_K: *block = 256; *bytes = 210; return true;
    case F32: *block = 16; *bytes = 64; return true;
    case F16: *block = 16; *bytes = 32; return true;
    case BF16: *block = 16; *bytes = 32; return true;
    default: return false;
  }
}

namespace {

// IEEE half -> float without F16C (the portable build may not have it).
float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise the mantissa
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400));
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Scalar decoders, one block each, in the reference's operation order (see the AVX-512
// file for why each is bit-identical to ggml's float32 values).
void deq_q4_0(const uint8_t* b, float* y) {
  const float d = half_to_float(b);
  for (int i = 0; i < 16; ++i) {
    y[i] = static_cast<float>((b[2 + i] & 15) - 8) * d;
    y[i + 16] = static_cast<float>((b[2 + i] >> 4) - 8) * d;
  }
}

void deq_q4_1(const uint8_t* b, float* y) {
  const float d = half_to_float(b), m = half_to_float(b + 2);
  for (int i = 0; i < 16; ++i) {
    y[i] = static_cast<float>(b[4 + i] & 15) * d + m;
    y[i + 16] = static_cast<float>(b[4 + i] >> 4) * d + m;
  }
}

void deq_five(const uint8_t* qh_p, const uint8_t* qs, int* q) {
  uint32_t qh;
  std::memcpy(&qh, qh_p, 4);
  for (int i = 0; i < 16; ++i) {
    q[i] = (qs[i] & 15) | (((qh >> i) & 1) << 4);
    q[i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
  }
}

void deq_q5_0(const uint8_t* b, float* y) {
  const float d = half_to_float(b);
  int q[32];
  deq_five(b + 2, b + 6, q);
  for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(q[i] - 16) * d;
}

void deq_q5_1(const uint8_t* b, float* y) {
  const float d = half_to_float(b), m = half_to_float(b + 2);
  int q[32];
  deq_five(b + 4, b + 8, q);
  for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(q[i]) * d + m;
}

void deq_q8_0(const uint8_t* b, float* y) {
  const float d = half_to_float(b);
  for (int i = 0; i < 32; ++i) y[i] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
}

void k_scale_min(const uint8_t* q, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = q[j] & 63;
    *mn = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void deq_q4_k(const uint8_t* b, float* y) {
  const float d = half_to_float(b), dmin = half_to_float(b + 2);
  const uint8_t* qs = b + 16;
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    k_scale_min(b + 4, j, &sc, &mn);
    const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j & 1);
    for (int l = 0; l < 32; ++l) y[32 * j + l] = dl * static_cast<float>((q[l] >> shift) & 15) - ml;
  }
}

void deq_q5_k(const uint8_t* b, float* y) {
  const float d = half_to_float(b), dmin = half_to_float(b + 2);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    k_scale_min(b + 4, j, &sc, &mn);
    const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
    const uint8_t* q = qs + 32 * (j / 2);
    const int shift = 4 * (j & 1);
    for (int l = 0; l < 32; ++l) {
      const int v = ((q[l] >> shift) & 15) | (((qh[l] >> j) & 1) << 4);
      y[32 * j + l] = dl * static_cast<float>(v) - ml;
    }
  }
}

void deq_q6_k(const uint8_t* b, float* y) {
  const float d = half_to_float(b + 208);
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b + 64 * h;
    const uint8_t* qh = b + 128 + 32 * h;
    for (int l = 0; l < 32; ++l) {
      const int is = 8 * h + l / 16;
      const int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      float* o = y + 128 * h;
      o[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
      o[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      o[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      o[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
  }
}

void deq_f32(const uint8_t* b, float* y) { std::memcpy(y, b, 64); }

void deq_f16(const uint8_t* b, float* y) {
  for (int i = 0; i < 16; ++i) y[i] = half_to_float(b + 2 * i);
}

void deq_bf16(const uint8_t* b, float* y) {
  for (int i = 0; i < 16; ++i) {
    const uint32_t bits = static_cast<uint32_t>(b[2 * i] | (b[2 * i + 1] << 8)) << 16;
    std::memcpy(y + i, &bits, 4);
  }
}

struct F16TableInit {
  F16TableInit() {
    for (uint32_t h = 0; h < 65536; ++h) {
      const uint8_t b[2] = {static_cast<uint8_t>(h & 0xFF), static_cast<uint8_t>(h >> 8)};
      f16_table[h] = half_to_float(b);
    }
  }
};

using BlockDecoder = void (*)(const uint8_t*, float*);

BlockDecoder decoder_for(int type) {
  switch (type) {
    case Q4_0: return deq_q4_0;
    case Q4_1: return deq_q4_1;
    case Q5_0: return deq_q5_0;
    case Q5_1: return deq_q5_1;
    case Q8_0: return deq_q8_0;
    case Q4_K: return deq_q4_k;
    case Q5_K: return deq_q5_k;
    case Q6_K: return deq_q6_k;
    case F32: return deq_f32;
    case F16: return deq_f16;
    case BF16: return deq_bf16;
    default: return nullptr;
  }
}

const F16TableInit f16_table_init;

}  // namespace

void dequant_row_scalar(int type, const uint8_t* row, int64_t K, void* out, bool bf16) {
  int bs, ts;
  block_shape(type, &bs, &ts);
  BlockDecoder dec = decoder_for(type);
  if (!bf16) {
    for (int64_t ib = 0; ib < K / bs; ++ib) dec(row + ib * ts, static_cast<float*>(out) + ib * bs);
    return;
  }
  float buf[256];
  uint16_t* o = static_cast<uint16_t*>(out);
  for (int64_t ib = 0; ib < K / bs; ++ib) {
    dec(row + ib * ts, buf);
    for (int i = 0; i < bs; ++i) {
      uint32_t b;
      std::memcpy(&b, buf + i, 4);
      const bool nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
      o[ib * bs + i] = static_cast<uint16_t>(nan ? (b >> 16) | 0x40 : (b + 0x7FFFu + ((b >> 16) & 1)) >> 16);
    }
  }
}

void transpose_acts16(const float* x, int64_t ldx, int64_t M, int64_t K, float* xt) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t m = 0; m < 16; ++m) xt[k * 16 + m] = m < M ? x[m * ldx + k] : 0.0f;
}

void matmul_f32_scalar(int type, const MatmulArgs& a, int64_t n0, int64_t n1) {
  int bs, ts;
  block_shape(type, &bs, &ts);
  BlockDecoder dec = decoder_for(type);
  const int64_t nb = a.K / bs;
  float buf[256];
  std::vector<float> acc(a.M);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = a.w + n * a.w_stride;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t ib = 0; ib < nb; ++ib) {
      dec(row + ib * ts, buf);
      for (int64_t m = 0; m < a.M; ++m) {
        const float* x = a.x + m * a.ldx + ib * bs;
        // Eight partial sums give the compiler independent chains to vectorise.
        float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int i = 0; i < bs; i += 8)
          for (int t = 0; t < 8; ++t) p[t] += x[i + t] * buf[i + t];
        acc[m] += ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
      }
    }
    for (int64_t m = 0; m < a.M; ++m) a.y[m * a.ldy + n] = acc[m];
  }
}

namespace {
inline float cache_at(const float* p, int64_t i) { return p[i]; }
inline float cache_at(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }

template <class T>
void attend_scalar_t(const AttendArgs& a, const float* q, int64_t lo, int64_t hi, float* scores, float* out) {
  const T* kc = static_cast<const T*>(a.kc);
  const T* vc = static_cast<const T*>(a.vc);
  float mx = -INFINITY;
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t slot = a.btab[j / a.bs] * a.bs + j % a.bs;
    const T* k = kc + slot * a.row_stride + a.head_off;
    float s = 0.0f;
    for (int64_t d = 0; d < a.hd; ++d) s += q[d] * cache_at(k, d);
    s *= a.scale;
    if (a.softcap > 0.0f) s = std::tanh(s / a.softcap) * a.softcap;
    scores[j - lo] = s;
    mx = std::max(mx, s);
  }
  float sum = 0.0f;
  for (int64_t j = lo; j < hi; ++j) sum += (scores[j - lo] = std::exp(scores[j - lo] - mx));
  std::fill(out, out + a.hd, 0.0f);
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t slot = a.btab[j / a.bs] * a.bs + j % a.bs;
    const T* v = vc + slot * a.row_stride + a.head_off;
    const float p = scores[j - lo];
    for (int64_t d = 0; d < a.hd; ++d) out[d] += p * cache_at(v, d);
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < a.hd; ++d) out[d] *= inv;
}
}  // namespace

void attend_scalar(const AttendArgs& a, const float* q, int64_t lo, int64_t hi, float* scores, float* out) {
  if (a.bf16)
    attend_scalar_t<uint16_t>(a, q, lo, hi, scores, out);
  else
    attend_scalar_t<float>(a, q, lo, hi, scores, out);
}

#ifdef MQ_HAVE_AVX512_TU
bool cpu_has_avx512() {
  // GCC/clang check the OS enables the zmm state (XGETBV) before reporting avx512*.
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

bool cpu_has_avx512_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }
#endif

}  // namespace mq

// ---------------------------------------------------------------- C ABI
//
// Called through ctypes rather than pybind11: the binding then needs only ATen/Parallel.h,
// which keeps the first-use compile to seconds (torch/extension.h alone takes ~45 s on a
// 2-core machine); the call itself costs about a microsecond. Python validates shapes and
// dtypes and keeps the tensors alive; errors come back as codes.

namespace {

enum Impl : int { AUTO = 0, SCALAR = 1, AVX512 = 2, VNNI = 3 };
enum Status : int { OK = 0, BAD_TYPE = 1, BAD_IMPL = 2, NO_ISA = 3, BAD_INDEX = 4, FAILED = 5 };

bool have_avx512() {
#ifdef MQ_HAVE_AVX512_TU
  static const bool ok = mq::cpu_has_avx512();
  return ok;
#else
  return false;
#endif
}

bool have_vnni() {
#ifdef MQ_HAVE_AVX512_TU
  static const bool ok = mq::cpu_has_avx512_vnni();
  return ok;
#else
  return false;
#endif
}

// AUTO is the exact variant; the integer one (VNNI) is only used when asked for.
int resolve(int impl, int* out) {
  if (impl == AUTO) impl = have_avx512() ? AVX512 : SCALAR;
  if (impl != SCALAR && impl != AVX512 && impl != VNNI) return BAD_IMPL;
  if ((impl == AVX512 && !have_avx512()) || (impl == VNNI && !have_vnni())) return NO_ISA;
  *out = impl;
  return OK;
}

}  // namespace

namespace mq {
bool use_avx512_kernels() { return have_avx512(); }

void matmul_jobs(const WeightJob* jobs, int nj, const float* x, int64_t M, int64_t K, bool avx512) {
  int64_t offs[MAX_JOBS + 1];
#ifdef MQ_HAVE_AVX512_TU
  if (avx512 && M >= BCAST_MIN_M && M <= BCAST_MAX_M) {
    // Transposed activations; the parallel range counts 16-row panels of each weight.
    static thread_local std::vector<float> xt;
    xt.resize(K * 16);
    transpose_acts16(x, K, M, K, xt.data());
    offs[0] = 0;
    for (int j = 0; j < nj; ++j) offs[j + 1] = offs[j] + (jobs[j].n + 15) / 16;
    const float* xtp = xt.data();
    parallel_for(offs[nj], grain_rows(K * 16 * 16), [&](int64_t b, int64_t e) {
      for (int j = 0; j < nj; ++j) {
        const int64_t p0 = std::max(b, offs[j]) - offs[j], p1 = std::min(e, offs[j + 1]) - offs[j];
        if (p0 >= p1) continue;
        const MatmulArgs a{x, K, M, K, jobs[j].w, jobs[j].w_stride, jobs[j].y, jobs[j].n};
        matmul_f32_avx512_bcast16(jobs[j].type, a, xtp, p0 * 16, std::min(jobs[j].n, p1 * 16));
      }
    });
    return;
  }
#endif
  offs[0] = 0;
  for (int j = 0; j < nj; ++j) offs[j + 1] = offs[j] + jobs[j].n;
  parallel_for(offs[nj], grain_rows(K * M), [&](int64_t b, int64_t e) {
    for (int j = 0; j < nj; ++j) {
      const int64_t n0 = std::max(b, offs[j]) - offs[j], n1 = std::min(e, offs[j + 1]) - offs[j];
      if (n0 >= n1) continue;
      const MatmulArgs a{x, K, M, K, jobs[j].w, jobs[j].w_stride, jobs[j].y, jobs[j].n};
#ifdef MQ_HAVE_AVX512_TU
      if (avx512) {
        matmul_f32_avx512(jobs[j].type, a, n0, n1);
        continue;
      }
#endif
      matmul_f32_scalar(jobs[j].type, a, n0, n1);
    }
  });
}
}  // namespace mq

extern "C" {

// At most n threads for the kernels from now on (0: no cap beyond torch's setting).
void mq_set_thread_cap(int n) { mq::set_thread_cap(n); }

// Bit 0: the AVX-512 kernels can run here; bit 1: the AVX-512 VNNI (integer) ones.
int mq_isa() { return (have_avx512() ? 1 : 0) | (have_vnni() ? 2 : 0); }

int mq_block_shape(int type, int* block, int* bytes) { return mq::block_shape(type, block, bytes) ? OK : BAD_TYPE; }

// y[M, N] = x[M, K] @ W.T, W's row n at w + n * w_stride; x and y contiguous.
int mq_matmul(int type, int impl, const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t w_stride,
              int64_t N, float* y) {
  int bs, ts;
  if (!mq::block_shape(type, &bs, &ts)) return BAD_TYPE;
  if (int st = resolve(impl, &impl)) return st;
#ifdef MQ_HAVE_AVX512_TU
  if (impl == VNNI) {
    if (!mq::vnni_supports(type) || K % 32) return BAD_TYPE;
    const mq::MatmulArgs a{x, K, M, K, w, w_stride, y, N};
    try {
      std::vector<int8_t> q(M * K);
      std::vector<float> d(M * K / 32), s(M * K / 32);
      std::vector<int32_t> nsum4(M * K / 4);
      mq::quantize_acts_avx512vnni(x, K, M, K, q.data(), d.data(), s.data(), nsum4.data());
      const mq::QuantizedActs qa{q.data(), d.data(), s.data(), nsum4.data(), K};
      mq::parallel_for(N, mq::grain_rows(K * M), [&](int64_t n0, int64_t n1) {
        mq::matmul_i8_avx512vnni(type, qa, a, n0, n1);
      });
    } catch (...) {
      return FAILED;
    }
    return OK;
  }
#endif
  try {
    const mq::WeightJob job{type, w, w_stride, N, y};
    mq::matmul_jobs(&job, 1, x, M, K, impl == AVX512);
  } catch (...) {
    return FAILED;
  }
  return OK;
}

// The per-call form of mq_matmul for a weight bound once (ctypes converts each argument
// on every call, so the fixed ones travel as one pointer).
struct MqWeight {
  int32_t type, impl;
  const uint8_t* w;
  int64_t w_stride, N, K;
};

int mq_matmul_bound(const MqWeight* b, const float* x, int64_t M, float* y) {
  return mq_matmul(b->type, b->impl, x, M, b->K, b->w, b->w_stride, b->N, y);
}

// out[R, K] = rows ids[0..R) of W (rows 0..R when ids is null), bit-identical to the
// reference dequantizer; bfloat16 (rounded to nearest even) instead of float32 when bf16.
int mq_dequantize(int type, int impl, const uint8_t* w, int64_t w_stride, int64_t N, int64_t K,
                  const int64_t* ids, int64_t R, void* out, int bf16) {
  int bs, ts;
  if (!mq::block_shape(type, &bs, &ts)) return BAD_TYPE;
  if (int st = resolve(impl, &impl)) return st;
  if (impl == VNNI) impl = AVX512;  // decoding has no integer variant
  for (int64_t r = 0; ids && r < R; ++r)
    if (ids[r] < 0 || ids[r] >= N) return BAD_INDEX;
  try {
    mq::parallel_for(R, mq::grain_rows(K * 4), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = w + (ids ? ids[r] : r) * w_stride;
        void* o = static_cast<char*>(out) + r * K * (bf16 ? 2 : 4);
#ifdef MQ_HAVE_AVX512_TU
        if (impl == AVX512) {
          mq::dequant_row_avx512(type, row, K, o, bf16 != 0);
          continue;
        }
#endif
        mq::dequant_row_scalar(type, row, K, o, bf16 != 0);
      }
    });
  } catch (...) {
    return FAILED;
  }
  return OK;
}

}  // extern "C"
