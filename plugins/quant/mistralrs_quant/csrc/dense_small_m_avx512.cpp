// The small-M dense kernel for AVX-512F CPUs (no BF16 extension): weights widened to
// float32 and multiplied with FMAs. Target pragma, not a command-line flag: called only
// after the runtime CPU check in dense_small_m.cpp.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
#endif

#include "dense_small_m_avx512.h"

void mq_dense::tile_avx512(const Args& a, int64_t n0, int64_t n1, float* buf) { tile(a, n0, n1, buf); }

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif
#endif
