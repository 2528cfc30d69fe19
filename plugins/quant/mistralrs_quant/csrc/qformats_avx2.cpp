// AVX2/FMA build of the portable format kernels (qformats_generic.h), for x86-64 CPUs
// without AVX-512: the same source as the scalar variant, compiled under a target pragma
// and called only after the runtime check. Decoded weights are the same bits as every other
// variant's (each is one rounding of an exact product, or HQQ's float64 sum).
#include <cstdint>

#include "qformats.h"

#if defined(__x86_64__) || defined(_M_X64)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace mq {
namespace {
#define MQ_FMA_Q_S_Z(q, s, z) __builtin_fmaf((q), (s), (z))  // vfmadd under this target
#include "qformats_generic.h"
}  // namespace

void fmt_decode_rows_avx2(const FmtWeight& f, int64_t n0, int64_t n1, float* out) {
  generic_decode_rows(f, n0, n1, out);
}

void fmt_dot_tile_avx2(const float* x, int64_t M, int64_t K, const float* tile, int64_t rows, float* y,
                       int64_t ldy) {
  generic_dot_tile(x, M, K, tile, rows, y, ldy);
}

bool cpu_has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

}  // namespace mq

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif  // x86-64
