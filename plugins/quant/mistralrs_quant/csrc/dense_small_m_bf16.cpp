// The small-M dense kernel for CPUs with AVX-512 BF16 (bf16 weights only): vdpbf16ps
// multiplies the bf16 pairs directly. Its products are exact in float32 like the widening
// kernel's; it sums each pair before adding it in, and treats bf16 subnormals as zero.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")
#endif

#define MQ_DENSE_DPBF16 1
#include "dense_small_m_avx512.h"

void mq_dense::tile_avx512bf16(const Args& a, int64_t n0, int64_t n1, float* buf) { tile(a, n0, n1, buf); }

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif
