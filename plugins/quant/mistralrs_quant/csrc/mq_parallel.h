// Parallel loops for the kernels, on torch's OpenMP pool (the same libgomp, so the
// process keeps one pool).
//
// A second, own spinning pool beside torch's was tried and measured: on a 2-core machine
// the two pools' idle spinning starved each other (a SmolLM2 decode step went from 16 ms
// to 0.5-1 s). The loop here opens its own `omp parallel` region rather than calling
// at::parallel_for so that it can use fewer threads than torch's setting: the thread cap
// (set_thread_cap) lets the Python side back off when other processes hold the cores,
// where every barrier of a full-width team waits on a descheduled thread (measured on 2
// cores with one busy process: 20 tok/s on two threads against 79 on one).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <climits>
#include <exception>
#include <mutex>
#include <thread>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace mq {

inline std::atomic<int>& thread_cap_ref() {
  static std::atomic<int> cap{1 << 30};
  return cap;
}
inline void set_thread_cap(int n) { thread_cap_ref().store(n > 0 ? n : 1 << 30); }
inline int thread_cap() { return thread_cap_ref().load(std::memory_order_relaxed); }

// Rows per task so that each task does at least 64K multiply-adds: below that, waking
// the pool costs more than it saves.
inline int64_t grain_rows(int64_t work_per_row) {
  const int64_t g = (int64_t{1} << 16) / (work_per_row > 0 ? work_per_row : 1);
  return g > 0 ? g : 1;
}

// f(begin, end) over contiguous chunks of [0, n) of at least `grain` items each, on at
// most min(torch's thread count, the cap) threads. Chunks depend only on the thread
// count, and every caller computes each output in one chunk, so results do not.
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  grain = grain > 0 ? grain : 1;
  int64_t chunks = std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()),
                                      static_cast<int64_t>(thread_cap()), (n + grain - 1) / grain});
#ifdef _OPENMP
  if (chunks > 1 && !omp_in_parallel()) {
    std::exception_ptr err = nullptr;
#pragma omp parallel num_threads(static_cast<int>(chunks))
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t b = n * t / nt, e = n * (t + 1) / nt;
      try {
        if (b < e) f(b, e);
      } catch (...) {
#pragma omp critical(mq_parallel_error)
        if (!err) err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
    return;
  }
#endif
  (void)chunks;
  f(int64_t{0}, n);
}

// Threads a team would get now: min(torch's count, the cap); 1 inside a parallel region.
inline int team_threads() {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
  return std::max(1, std::min(at::get_num_threads(), thread_cap()));
#else
  return 1;
#endif
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// A barrier for the threads of one parallel region (run_team). It spins first, the
// partner being normally a few hundred ns away, then sleeps on a futex. Sleeping matters on
// a busy machine: a waiter that only spun (or sched_yield'ed) kept its core busy, so the
// scheduler never moved its descheduled partner there, and every barrier waited out a time
// slice (2 cores, one busy process: a SmolLM2 step 190 ms against 15 ms with libgomp's
// fork/join, whose threads sleep). The first exception a member reports (fail) is rethrown
// by the caller after the region.
class SpinBarrier {
 public:
  void set_size(int n) { n_ = n; }
  void wait() {
    const unsigned g = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(g + 1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_all();
      return;
    }
    for (int i = 0; i < kSpins; ++i) {
      if (gen_.load(std::memory_order_acquire) != g) return;
      cpu_relax();
    }
    // Announced before the last check, so the releaser (store gen, then read sleepers,
    // both seq_cst) either sees this sleeper or this check sees its new generation.
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    while (gen_.load(std::memory_order_seq_cst) == g) sleep_while(g);
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
  }
  void fail(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!err_) err_ = e;
  }
  void rethrow() {
    if (err_) std::rethrow_exception(err_);
  }

 private:
#ifdef __linux__
  // The kernel sleeps only while gen_ still holds g (no lost wake-up).
  void sleep_while(unsigned g) {
    syscall(SYS_futex, reinterpret_cast<unsigned*>(&gen_), FUTEX_WAIT_PRIVATE, g, nullptr, nullptr, 0);
  }
  void wake_all() {
    syscall(SYS_futex, reinterpret_cast<unsigned*>(&gen_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
  }
#else
  void sleep_while(unsigned) { std::this_thread::yield(); }
  void wake_all() {}
#endif
  // ~25 us of pauses. Measured on 2 cores, SmolLM2 step at 2 threads, quiet / one busy
  // process beside it: 4096 spins 4.65 / 22.4 ms, 512: 4.77 / 11.7, 64: 5.42 / 7.5
  // (libgomp fork/join: 5.72 / 8.2; the thread tuner moves a busy machine to one thread).
  static constexpr int kSpins = 512;
  static_assert(sizeof(std::atomic<unsigned>) == sizeof(unsigned), "futex word");
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<unsigned> gen_{0};
  alignas(64) std::atomic<int> sleepers_{0};
  int n_ = 1;
  std::mutex mu_;
  std::exception_ptr err_;
};

// f(tid, n) on every thread of one parallel region of (up to) nt threads, bar sized to
// the team that actually started. f must not throw (report through bar.fail).
template <class F>
void run_team(int nt, SpinBarrier& bar, F&& f) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
  {
#pragma omp single
    bar.set_size(omp_get_num_threads());
    f(omp_get_thread_num(), omp_get_num_threads());
  }
#else
  (void)nt;
  bar.set_size(1);
  f(0, 1);
#endif
}

}  // namespace mq
