// Interface between the binding (ggml_cpu.cpp, portable flags) and the kernels.
//
// The AVX-512 kernels live in their own translation unit compiled under a target pragma
// and include nothing but intrinsics, so no inline function from a shared header (STL,
// torch) can be emitted there with AVX-512 instructions and then picked by the linker for
// the portable code: the extension must load and fall back on any x86-64 or ARM CPU.
#pragma once
#include <cstdint>
#include <cstring>

namespace mq {

// ggml type ids (GGMLQuantizationType values).
enum GGMLType : int {
  F32 = 0, F16 = 1, BF16 = 30,  // dense rows, as 16-element "blocks" (used by the decoder step)
  Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q4_K = 12, Q5_K = 13, Q6_K = 14,
};

// float value of every IEEE half bit pattern. The AVX-512 kernels read block scales
// through it: a broadcast from memory uses only a load port, whereas converting with F16C
// and broadcasting from a register takes two shuffle-port uops per scale, and the shuffle
// port is what the 4/5-bit decoders are bound by.
extern float f16_table[65536];

// Whether the AVX-512 kernels run on this CPU (checked once).
bool use_avx512_kernels();

// Elements and bytes per block; false for a type the kernels do not handle.
bool block_shape(int type, int* block, int* bytes);

// Rows [n0, n1) of the weight against all M activation rows:
//   y[m * ldy + n] = sum_k x[m * ldx + k] * W[n, k]
// with W[n] the ggml blocks at w + n * w_stride (K / block blocks).
struct MatmulArgs {
  const float* x; int64_t ldx; int64_t M; int64_t K;
  const uint8_t* w; int64_t w_stride;
  float* y; int64_t ldy;
};

// xt[k * 16 + m] = x[m * ldx + k] for m < M (M <= 16), zero for the other lanes.
void transpose_acts16(const float* x, int64_t ldx, int64_t M, int64_t K, float* xt);

// One weight of a multi-weight product: rows W[n] at w + n * w_stride, output y [M, n].
struct WeightJob { int type; const uint8_t* w; int64_t w_stride; int64_t n; float* y; };
constexpr int MAX_JOBS = 8;

// y_j = x @ W_j^T (exact float32) for up to MAX_JOBS weights that share x [M, K] (ldx = K),
// as one parallel range over all their rows, so q/k/v or gate/up are one dispatch. Picks
// the 9-16-row broadcast kernels or the row-at-a-time ones; avx512 = false forces the
// portable code. Defined in ggml_cpu.cpp.
void matmul_jobs(const WeightJob* jobs, int nj, const float* x, int64_t M, int64_t K, bool avx512);

// Exact variant: weights decoded to their float32 values in registers, float32 FMAs.
void matmul_f32_scalar(int type, const MatmulArgs& a, int64_t n0, int64_t n1);
// One row's values into out: float32, or bfloat16 (round to nearest even) when bf16.
void dequant_row_scalar(int type, const uint8_t* row, int64_t K, void* out, bool bf16);

// Integer variant (ggml's approach, see ggml_vnni.cpp): activations quantized to int8 per
// 32 once per call. Row m of each array starts at m * K (q), m * K / 32 (d, s), m * K / 4
// (nsum4).
struct QuantizedActs {
  const int8_t* q;       // codes
  const float* d;        // scale per 32
  const float* s;        // exact float sum of the 32 activations
  const int32_t* nsum4;  // -(sum of each 4 consecutive codes)
  int64_t K;
};

// One query row of one head against keys [lo, hi) of a sequence in the paged KV cache:
// the key of position j is at kc + slot(j) * row_stride + head_off with
// slot(j) = btab[j / bs] * bs + j % bs (values likewise in vc). out[hd] = softmax(q.k *
// scale, optionally soft-capped) @ v. `scores` has room for hi - lo floats. The cache holds
// float32, or bfloat16 when bf16 (row_stride and head_off count elements either way).
struct AttendArgs {
  const void* kc; const void* vc; int64_t row_stride; int64_t head_off; int64_t hd;
  const int64_t* btab; int64_t bs; float scale; float softcap; bool bf16;
};

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN kept quiet: torch's float -> bfloat16 conversion.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
void attend_scalar(const AttendArgs& a, const float* q, int64_t lo, int64_t hi, float* scores, float* out);

#if defined(__x86_64__) || defined(_M_X64)
#define MQ_HAVE_AVX512_TU 1
bool cpu_has_avx512();   // F, BW, VL, DQ, FMA, F16C and OS support for zmm state
void matmul_f32_avx512(int type, const MatmulArgs& a, int64_t n0, int64_t n1);
// 9-16 activation rows, given transposed: xt[k * 16 + m] (lanes m >= M zero).
void matmul_f32_avx512_bcast16(int type, const MatmulArgs& a, const float* xt, int64_t n0, int64_t n1);
constexpr int64_t BCAST_MIN_M = 9, BCAST_MAX_M = 16;
void dequant_row_avx512(int type, const uint8_t* row, int64_t K, void* out, bool bf16);
void attend_avx512(const AttendArgs& a, const float* q, int64_t lo, int64_t hi, float* scores, float* out);
bool cpu_has_avx512_vnni();
bool vnni_supports(int type);
void quantize_acts_avx512vnni(const float* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, float* d, float* s,
                              int32_t* nsum4);
void matmul_i8_avx512vnni(int type, const QuantizedActs& qa, const MatmulArgs& a, int64_t n0, int64_t n1);
#endif

}  // namespace mq
