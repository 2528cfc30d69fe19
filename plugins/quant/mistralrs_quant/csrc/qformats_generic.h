// Portable decode and dot loops of the format kernels (see qformats.h), written for the
// auto-vectoriser. Included inside an anonymous namespace by qformats_cpu.cpp (baseline
// ISA: the scalar variant) and by qformats_avx2.cpp (under an AVX2/FMA target pragma), so
// each translation unit gets its own copy and no code compiled for AVX2 is shared with the
// portable one. Includes nothing: the includer provides <cstdint>, qformats.h and
// MQ_FMA_Q_S_Z(q, s, z), q s + z rounded once to float.

inline int64_t gmin64(int64_t a, int64_t b) { return a < b ? a : b; }

inline void generic_decode_rows(const FmtWeight& f, int64_t n0, int64_t n1, float* out) {
  const int64_t K = f.K;
  for (int64_t n = n0; n < n1; ++n) {
    float* o = out + (n - n0) * K;
    switch (f.kind) {
      case FMT_F8Q8: {
        const uint8_t* row = f.w + n * (K / 32) * 33;
        for (int64_t b = 0; b < K / 32; ++b) {
          const uint8_t* blk = row + b * 33;
          // as the torch path: fp8 -> float32, / 448 in float32, times each code
          const float d = fp8_table[blk[0]] / 448.0f;
          for (int i = 0; i < 32; ++i) o[b * 32 + i] = static_cast<float>(static_cast<int8_t>(blk[1 + i])) * d;
        }
        break;
      }
      case FMT_FP8: {
        const uint8_t* row = f.w + n * K;
        for (int64_t k = 0; k < K; ++k) o[k] = fp8_table[row[k]];
        break;
      }
      case FMT_FP8_BLOCK: {
        const uint8_t* row = f.w + n * K;
        const int64_t nbc = (K + f.bc - 1) / f.bc;
        const float* s = f.scale + (n / f.br) * nbc;
        for (int64_t k = 0; k < K; ++k) o[k] = fp8_table[row[k]] * s[k / f.bc];
        break;
      }
      case FMT_HQQ4:
      case FMT_HQQ8: {
        // Element (n, k) is element f = n K + k of the flattened weight, which HQQ views as
        // [G, ncols]: group-view row r = f / ncols, column c = f % ncols (the group).
        const int64_t G = f.br, ncols = f.N * K / G, half = G / 2;
        for (int64_t k = 0; k < K;) {
          const int64_t flat = n * K + k, r = flat / ncols, c = flat % ncols;
          const int64_t len = gmin64(K - k, ncols - c);
          // 4-bit: group-view rows r < G/2 in the high nibbles of byte row r, the others
          // in the low nibbles of byte row r - G/2
          const bool high = f.kind == FMT_HQQ4 && r < half;
          const uint8_t* q = f.w + ((f.kind == FMT_HQQ4 && !high) ? r - half : r) * ncols + c;
          const int shift = high ? 4 : 0, mask = f.kind == FMT_HQQ4 ? 15 : 255;
          const float* s = f.scale + c;
          const float* z = f.aux + c;
          float* out = o + k;
          for (int64_t i = 0; i < len; ++i) {
            // q s + (-z s) rounded once, as the AVX-512 kernel's FMA and torch's addcmul on
            // AVX CPUs (MQ_FMA_Q_S_Z, defined by the includer; see there)
            const int qv = (q[i] >> shift) & mask;
            out[i] = MQ_FMA_Q_S_Z(static_cast<float>(qv), s[i], z[i]);
          }
          k += len;
        }
        break;
      }
      default:
        break;
    }
  }
}

inline void generic_dot_tile(const float* x, int64_t M, int64_t K, const float* tile, int64_t rows, float* y,
                         int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* w = tile + r * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      // 32 partial sums: independent chains the vectoriser maps onto 4-8 registers
      float p[32] = {};
      int64_t k = 0;
      for (; k + 32 <= K; k += 32)
        for (int t = 0; t < 32; ++t) p[t] += xm[k + t] * w[k + t];
      for (; k < K; ++k) p[k & 31] += xm[k] * w[k];
      for (int t = 0; t < 8; ++t) p[t] = (p[t] + p[t + 8]) + (p[t + 16] + p[t + 24]);
      y[m * ldy + r] = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    }
  }
}

