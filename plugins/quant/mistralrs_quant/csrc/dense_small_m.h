// Small-M dense matmul for bf16/f16 weights: y[M, N] = x[M, K] @ W[N, K]^T with float32
// accumulation and one rounding to the weight dtype, after an optional epilogue
// (bias, gelu_tanh, a residual added). Used for decode steps of a few rows, where the
// matmul only streams W and oneDNN's packed GEMM runs well below the memory bandwidth.
//
// The weight stays in its plain row-major form (W[n] at w + n * sw), so the same tensor
// also serves torch's own matmul for large M.
#pragma once
#include <cstdint>

namespace mq_dense {

// Output rows are computed in tiles of TILE weight rows: the sums of one tile go to a
// float32 buffer [M][TILE_STRIDE] and the epilogue then runs vectorised along N.
// TILE_STRIDE leaves room for the rows a register block computes past a tile's end.
constexpr int64_t TILE = 128;
constexpr int64_t TILE_STRIDE = TILE + 16;

struct Args {
  bool f16;             // weights, activations, bias, residual and output: f16 (else bf16)
  int64_t m, k;         // rows of x, reduction length
  int64_t kp;           // k rounded up to 32: the stride of the two x copies below
  const uint16_t* xh;   // x in the weight dtype, [m][kp], zero past k
  const float* xf;      // the same values as float32, [m][kp], zero past k
  const uint16_t* w;    // W[n] at w + n * sw
  int64_t n, sw;
  const uint16_t* bias; // [n] or null
  int act;              // 0: none, 1: gelu_tanh (after the bias, before the residual)
  const uint16_t* other;// residual [m][so] or null
  int64_t so;
  uint16_t* y;          // [m][sy]
  int64_t sy;
};

// Rows [n0, n1) of y, n1 - n0 <= TILE; buf holds m * TILE_STRIDE floats.
void tile_scalar(const Args& a, int64_t n0, int64_t n1, float* buf);
#if defined(__x86_64__) || defined(_M_X64)
#define MQ_DENSE_X86 1
void tile_avx512(const Args& a, int64_t n0, int64_t n1, float* buf);      // convert + FMA
void tile_avx512bf16(const Args& a, int64_t n0, int64_t n1, float* buf);  // vdpbf16ps, bf16 only
#if defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define MQ_DENSE_AMX 1
// AMX tiles, bf16 only: the activations in pairs of k first (amx_pack_x: kp/2 * m dwords),
// then tiles; amx_usable asks the OS for the tile state (once per process).
bool amx_usable();
void amx_pack_x(const Args& a, uint32_t* xt);
void tile_amx(const Args& a, const uint32_t* xt, int64_t n0, int64_t n1, float* buf);
#endif
#endif

}  // namespace mq_dense
