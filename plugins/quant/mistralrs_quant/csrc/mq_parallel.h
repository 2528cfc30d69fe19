// Parallel loops for the kernels: torch's intra-op pool (OpenMP), so that the process has
// one pool. A second spinning pool beside torch's was tried and measured: on a 2-core
// machine the two pools' idle spinning starved each other (a SmolLM2 decode step went
// from 16 ms to 0.5-1 s). The decoder step therefore also runs its phases on this pool.
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>

namespace mq {

// f(begin, end) over chunks of [0, n) of at least `grain` items each.
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  at::parallel_for(0, n, grain > 0 ? grain : 1, [&](int64_t b, int64_t e) { f(b, e); });
}

}  // namespace mq
