// The small-M dense kernel on AMX (bf16 weights): y^T = W x^T with W's rows loaded as the
// A tiles straight from the plain weight (16 rows x 32 k at the row stride: no repacking),
// x^T as the B tile (pairs of k per activation row, the VNNI layout, built once per call)
// and 16 x M float32 accumulators per block of 16 weight rows. A tile product costs about
// as long as loading its 1 KB of weights, so up to 16 rows the kernel stays bound by
// memory, where the AVX-512 kernels are bound by their FMAs from ~4 rows on.
//
// Needs the OS's permission for the tile state (arch_prctl, asked once per process) and a
// tile configuration per thread (loaded at the start of each call's work, released after).
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,amx-tile,amx-bf16")

#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "dense_small_m_avx512.h"

namespace {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: accumulators of 4 blocks of 16 weight rows; 4, 5: weight tiles; 6: x^T.
void configure(int64_t mc) {
  TileConfig c;
  for (int t = 0; t < 7; ++t) c.rows[t] = 16;
  for (int t = 0; t < 4; ++t) c.colsb[t] = uint16_t(mc * 4);
  c.colsb[4] = c.colsb[5] = 64;
  c.colsb[6] = uint16_t(mc * 4);
  _tile_loadconfig(&c);
}

// Sums over k in [kb, ke) (whole 32-k chunks) of the weight rows w[0..16*NB) (stride sw
// elements) with the mc activation rows of xt, into c (16*NB x mc floats).
template <int NB>
void blocks(const uint16_t* w, int64_t sw, int64_t kb, int64_t ke, const uint32_t* xt, int64_t mc, float* c) {
  const int64_t sb = sw * 2, xb = mc * 4;
  _tile_zero(0);
  if (NB > 1) _tile_zero(1);
  if (NB > 2) _tile_zero(2);
  if (NB > 3) _tile_zero(3);
  for (int64_t k = kb; k < ke; k += 32) {
    _tile_loadd(6, xt + (k / 2) * mc, xb);
    _tile_loadd(4, w + k, sb);
    if (NB > 1) _tile_loadd(5, w + 16 * sw + k, sb);
    _tile_dpbf16ps(0, 4, 6);
    if (NB > 1) _tile_dpbf16ps(1, 5, 6);
    if (NB > 2) {
      _tile_loadd(4, w + 32 * sw + k, sb);
      if (NB > 3) _tile_loadd(5, w + 48 * sw + k, sb);
      _tile_dpbf16ps(2, 4, 6);
      if (NB > 3) _tile_dpbf16ps(3, 5, 6);
    }
  }
  _tile_stored(0, c, xb);
  if (NB > 1) _tile_stored(1, c + 16 * mc, xb);
  if (NB > 2) _tile_stored(2, c + 32 * mc, xb);
  if (NB > 3) _tile_stored(3, c + 48 * mc, xb);
}

// Adds the sums over k in [kb, kb + 32) of rows w[0..rows) (rows <= 16; columns past k are
// zero) into c: through a zero-padded copy, since a tile load reads a whole 16 x 64-byte
// box, which would run past the weight's end or into the next row.
void padded_chunk(const uint16_t* w, int64_t sw, int64_t rows, int64_t kb, int64_t k, const uint32_t* xt,
                  int64_t mc, float* c) {
  alignas(64) uint16_t pad[16 * 32] = {};
  alignas(64) float part[16 * 16];
  const int64_t cols = std::min<int64_t>(32, k - kb);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(pad + r * 32, w + r * sw + kb, cols * 2);
  blocks<1>(pad - kb, 32, kb, kb + 32, xt, mc, part);
  for (int64_t j = 0; j < rows * mc; ++j) c[j] += part[j];
}

bool os_allows_amx() {
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; torch's oneDNN asks the same.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

}  // namespace

bool mq_dense::amx_usable() { return os_allows_amx(); }

// x^T in pairs of k for each chunk of at most 16 activation rows: xt[(c * kp2 + p) * 16 + m]
// holds x[c*16 + m][2p, 2p+1] (zero past k), kp2 = kp / 2.
void mq_dense::amx_pack_x(const Args& a, uint32_t* xt) {
  const int64_t kp2 = a.kp / 2;
  for (int64_t m0 = 0; m0 < a.m; m0 += 16) {
    const int64_t mc = std::min<int64_t>(16, a.m - m0);
    uint32_t* dst = xt + m0 * kp2;
    for (int64_t p = 0; p < kp2; ++p)
      for (int64_t i = 0; i < mc; ++i) {
        uint32_t v;
        std::memcpy(&v, a.xh + (m0 + i) * a.kp + 2 * p, 4);
        dst[p * mc + i] = v;
      }
  }
}

void mq_dense::tile_amx(const Args& a, const uint32_t* xt, int64_t n0, int64_t n1, float* buf) {
  const int64_t kp2 = a.kp / 2, kfull = a.k & ~int64_t(31);
  alignas(64) float c[64 * 16];
  for (int64_t m0 = 0; m0 < a.m; m0 += 16) {
    const int64_t mc = std::min<int64_t>(16, a.m - m0);
    const uint32_t* x = xt + m0 * kp2;
    configure(mc);
    for (int64_t n = n0; n < n1; n += 64) {
      const int64_t nr = std::min<int64_t>(64, n1 - n), full = nr / 16, rem = nr % 16;
      const uint16_t* w = a.w + n * a.sw;
      if (full == 4) {
        blocks<4>(w, a.sw, 0, kfull, x, mc, c);
      } else {
        for (int64_t b = 0; b < full; ++b) blocks<1>(w + 16 * b * a.sw, a.sw, 0, kfull, x, mc, c + 16 * b * mc);
      }
      if (rem) {
        std::memset(c + full * 16 * mc, 0, sizeof(float) * 16 * mc);
        for (int64_t k = 0; k < kfull; k += 32) padded_chunk(w + full * 16 * a.sw, a.sw, rem, k, a.k, x, mc,
                                                              c + full * 16 * mc);
      }
      if (kfull < a.k)
        for (int64_t g = 0; g * 16 < nr; ++g)
          padded_chunk(w + g * 16 * a.sw, a.sw, std::min<int64_t>(16, nr - g * 16), kfull, a.k, x, mc,
                       c + g * 16 * mc);
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t i = 0; i < mc; ++i) buf[(m0 + i) * mq_dense::TILE_STRIDE + (n - n0) + r] = c[r * mc + i];
    }
  }
  _tile_release();
  epilogue(a, n0, n1, buf);
}

#pragma GCC pop_options
#endif
