// A probe of this CPU's AMX bf16 rate, for bench/amx_gemm_ceiling.py (not part of the engine).
//
// Three measurements on one thread:
//   amx_peak:  tile products on registers only (no memory): the unit's own rate;
//   amx_l1:    the same products with their four operand tiles loaded from L1 every time;
//   amx_gemm:  a plain GEMM built from those products (2 x 2 tiles: 32 rows x 32 columns of
//              float32 accumulators, both operands packed into contiguous 1 KB tiles, the
//              whole K in the accumulators, optional software prefetch of the next tiles).
// The gap between amx_l1 and amx_gemm is what feeding the tiles from L2 costs; oneDNN's
// GEMM (what torch and transformers call) is timed beside it by the Python script.
//
// Build: g++ -O2 -shared -fPIC -mamx-tile -mamx-bf16 -mavx512f (the script does it).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstring>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Eight 16 x 64-byte tiles: 0-3 accumulators, 4-5 A (rows), 6-7 B (columns).
void configure() {
  TileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

extern "C" {

// 0 when the OS lets this process use the tile registers (ARCH_REQ_XCOMP_PERM, XTILEDATA).
int amx_init() { return int(syscall(SYS_arch_prctl, 0x1023, 18)); }

// Seconds for iters x 4 tile products (16 x 16 x 32 each) with no memory operands.
double amx_peak(int64_t iters) {
  configure();
  alignas(64) static uint16_t z[16 * 32] = {};
  _tile_loadd(4, z, 64);
  _tile_loadd(5, z, 64);
  _tile_loadd(6, z, 64);
  _tile_loadd(7, z, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  const double s = seconds_since(t0);
  _tile_release();
  return s;
}

// The same products, each group of four reloading its four operand tiles (4 KB, in L1).
double amx_l1(int64_t iters) {
  configure();
  alignas(64) static uint16_t t[4][16 * 32] = {};
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    _tile_loadd(4, t[0], 64);
    _tile_loadd(6, t[1], 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, t[2], 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, t[3], 64);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  const double s = seconds_since(t0);
  _tile_release();
  return s;
}

// a [m, k] bf16 row-major (m % 16 == 0, k % 32 == 0) -> [m/16][k/32] tiles of 16 rows x 32 k.
void amx_pack_a(const uint16_t* a, int64_t m, int64_t k, uint16_t* out) {
  const int64_t kt = k / 32;
  for (int64_t mb = 0; mb < m / 16; ++mb)
    for (int64_t kb = 0; kb < kt; ++kb)
      for (int64_t r = 0; r < 16; ++r)
        std::memcpy(out + (mb * kt + kb) * 512 + r * 32, a + (mb * 16 + r) * k + kb * 32, 64);
}

// w [n, k] bf16 row-major (n % 16 == 0, k % 32 == 0) -> [n/16][k/32] tiles of 16 pairs of k
// x 16 columns (the pair-interleaved layout the B operand of a tile product takes).
void amx_pack_b(const uint16_t* w, int64_t n, int64_t k, uint16_t* out) {
  const int64_t kt = k / 32;
  for (int64_t nb = 0; nb < n / 16; ++nb)
    for (int64_t kb = 0; kb < kt; ++kb) {
      uint16_t* t = out + (nb * kt + kb) * 512;
      for (int64_t p = 0; p < 16; ++p)
        for (int64_t c = 0; c < 16; ++c) {
          const uint16_t* src = w + (nb * 16 + c) * k + kb * 32 + 2 * p;
          t[p * 32 + 2 * c] = src[0];
          t[p * 32 + 2 * c + 1] = src[1];
        }
    }
}

// c [m, n] float32 = a @ w^T from the packed operands (m % 32 == 0, n % 32 == 0).
// prefetch > 0: prefetch the tiles that many k-steps ahead into L1.
void amx_gemm(const uint16_t* ap, const uint16_t* bp, float* c, int64_t m, int64_t n, int64_t k,
              int prefetch) {
  configure();
  const int64_t kt = k / 32;
  for (int64_t j = 0; j < n; j += 32) {
    const uint16_t* b0 = bp + (j / 16) * kt * 512;
    const uint16_t* b1 = b0 + kt * 512;
    for (int64_t i = 0; i < m; i += 32) {
      const uint16_t* a0 = ap + (i / 16) * kt * 512;
      const uint16_t* a1 = a0 + kt * 512;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t s = 0; s < kt; ++s) {
        if (prefetch > 0 && s + prefetch < kt) {
          const int64_t o = (s + prefetch) * 512;
          for (int l = 0; l < 512; l += 32) {
            _mm_prefetch(reinterpret_cast<const char*>(a0 + o + l), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(a1 + o + l), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(b0 + o + l), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(b1 + o + l), _MM_HINT_T0);
          }
        }
        _tile_loadd(4, a0 + s * 512, 64);
        _tile_loadd(6, b0 + s * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, b1 + s * 512, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a1 + s * 512, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      float* o = c + i * n + j;
      _tile_stored(0, o, n * 4);
      _tile_stored(1, o + 16, n * 4);
      _tile_stored(2, o + 16 * n, n * 4);
      _tile_stored(3, o + 16 * n + 16, n * 4);
    }
  }
  _tile_release();
}

}  // extern "C"
