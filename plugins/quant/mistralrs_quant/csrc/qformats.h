// Kernels for the non-ggml weight formats (F8Q8, FP8 per tensor / in blocks, HQQ 4/8-bit):
// interface between the binding (qformats_cpu.cpp, portable flags) and the AVX-512 and
// AVX2 translation units (qformats_avx512.cpp, qformats_avx2.cpp), which, like
// ggml_avx512.cpp, include nothing but intrinsics and these headers so no inline function
// compiled for those ISAs can leak into the portable code.
//
// Every kernel decodes a tile of weight rows to the exact float32 values the format's
// torch path builds (its `dequantize`/`forward` in formats/*.py) and multiplies them in
// with float32 FMAs, so results differ from `F.linear(x, dequantized)` only by summation
// order.
#pragma once
#include <cstdint>

namespace mq {

enum FmtKind : int32_t {
  FMT_F8Q8 = 1,       // rows of 33-byte blocks: fp8 e4m3 scale byte (d * 448) + 32 int8
  FMT_FP8 = 2,        // fp8 e4m3 codes [N, K]; one scale applied to the product (torch's order)
  FMT_FP8_BLOCK = 3,  // fp8 e4m3 codes [N, K]; w = q * scale[n / br][k / bc]
  FMT_HQQ4 = 4,       // HQQ, groups down the flattened weight; codes packed two per byte
  FMT_HQQ8 = 5,
};

// A weight bound once from Python (ctypes Structure of the same layout).
struct FmtWeight {
  int32_t kind;
  int32_t impl;          // 0 auto (AVX-512, else AVX2, else scalar), 1 scalar, 2 avx512, 4 avx2
  const uint8_t* w;      // codes (HQQ: w_q [G or G/2, ncols])
  const float* scale;    // FP8 block: [ceil(N/br), ceil(K/bc)]; HQQ: scales [ncols]
  const float* aux;      // HQQ: -(zero * scale) [ncols]
  int64_t N, K;
  int64_t br, bc;        // FP8 block: block rows/cols; HQQ: br = group size
  float tensor_scale;    // FP8 per tensor: multiplies every output
};

// fp8 e4m3fn -> float32 for every byte (0x7F / 0xFF are NaN).
extern float fp8_table[256];

// Rows [n0, n1) decoded into out[(n - n0) * K + k]. FMT_FP8 gives the codes' values
// (the per-tensor scale is applied to the product, as the torch path does).
void fmt_decode_rows_scalar(const FmtWeight& f, int64_t n0, int64_t n1, float* out);
// y[m * N + n] = x[m] . out-row for the rows of one decoded tile.
void fmt_dot_tile_scalar(const float* x, int64_t M, int64_t K, const float* tile, int64_t rows, float* y,
                         int64_t ldy);

#if defined(__x86_64__) || defined(_M_X64)
#define MQ_HAVE_FMT_AVX512 1
void fmt_decode_rows_avx512(const FmtWeight& f, int64_t n0, int64_t n1, float* out);
// F8Q8 and FP8 (blocks 32-aligned) with M <= 4: decoded in registers, no tile.
bool fmt_direct_avx512_supports(const FmtWeight& f, int64_t M);
void fmt_matmul_direct_avx512(const FmtWeight& f, const float* x, int64_t M, float* y, int64_t n0, int64_t n1);
void fmt_dot_tile_avx512(const float* x, int64_t M, int64_t K, const float* tile, int64_t rows, float* y,
                         int64_t ldy);
void fmt_decode_rows_avx2(const FmtWeight& f, int64_t n0, int64_t n1, float* out);
void fmt_dot_tile_avx2(const float* x, int64_t M, int64_t K, const float* tile, int64_t rows, float* y,
                       int64_t ldy);
bool cpu_has_avx2_fma();
// float32 -> bfloat16 bits (round to nearest even, NaN stays quiet), n a multiple of 16.
void f32_to_bf16_avx512(const float* in, int64_t n, uint16_t* out);
#endif

}  // namespace mq
