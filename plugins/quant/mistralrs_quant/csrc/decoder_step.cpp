// The decoder step: every layer of a decoder-only transformer for a handful of tokens
// (decode steps and small mixed batches) in one call, over the engine's paged KV cache.
//
// At batch 1 a small model's decode is mostly overhead when run op by op from Python
// (~30 tensor ops per layer, each a dispatch, an allocation and often a thread-pool
// wake-up); here a layer is five parallel phases on the kernel pool (q/k/v, attention,
// o, gate/up with the activation, down) with the small elementwise work done in between
// on one thread; decode steps run all of them in one parallel region (see Phases). The math is the float32 math of the torch path (models/decoder.py): the same
// norms, rotary embedding, attention and activations, in float32, so results differ only
// by summation order. Python (fused_decoder.py) checks that a model fits this layout and
// falls back to the torch path for anything it does not cover.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ggml_kernels.h"
#include "mq_parallel.h"

namespace {

// Must match the ctypes structures in fused_decoder.py.
struct MqLin {            // y = x W^T (+ bias); W's row n at w + n * w_stride, as ggml blocks
  int32_t type, _pad;
  const uint8_t* w;
  int64_t w_stride, n, k;
  const float* bias;      // nullable
};

// A sparse mixture-of-experts feed-forward (layers/moe.py's SparseMoE, the routings the
// Python side accepts): router, softmax over all experts then top-k (or top-k on the
// logits then softmax over the k), optional renormalisation and scaling, each expert a
// gated MLP. Shared experts are not covered (no family the step serves has them).
struct MqMoE {
  int32_t n_experts, top_k, inter, act, renormalize, softmax_after_topk;
  float renorm_eps, routed_scale;
  MqLin router;            // [E, hidden]
  const MqLin* experts;    // 3 per expert: gate, up, down
};

struct MqLayer {
  MqLin q, k, v, o, gate, up, down;
  // Norm weights with any offset already added (Gemma's 1 + w); null when absent.
  const float *in_norm, *post_attn_norm, *pre_ffn_norm, *post_ffn_norm, *q_norm, *k_norm;
  void *kc, *vc;           // [blocks, block_size, n_kv, head_dim] float32 (bfloat16: kv_bf16)
  int32_t window;          // sliding window (0: full attention)
  int32_t rope;            // 0: none, 1: global cos/sin, 2: local cos/sin
  const MqMoE* moe;        // non-null: the feed-forward is this instead of gate/up/down
};

struct MqModel {
  int32_t n_layers, hidden, n_heads, n_kv, head_dim, inter, rot_dim, act, sandwich, block_size;
  float eps, scale, softcap;
  int32_t force_scalar;    // run the portable kernels even where AVX-512 is available (tests)
  const MqLayer* layers;
  const float* final_norm;
  int32_t kv_bf16;         // the paged cache holds bfloat16 (the residual stays float32 inside)
};

struct MqStep {
  int64_t T;
  float* h;                                  // [T, hidden]: embeddings in, final hidden out
  const float *cos, *sin, *cos_l, *sin_l;    // [T, rot_dim] (rotate-half layout)
  const int64_t *slots, *pos, *seq, *btab;   // per token; btab [B, btab_stride]
  int64_t btab_stride;
};

enum Act : int32_t { SILU = 0, GELU_TANH = 1, GELU = 2 };

struct LinJob { const MqLin* lin; const float* x; float* y; };

// The jobs' products (one shared x, so q/k/v or gate/up are one dispatch), then biases.
void run_linears(const LinJob* jobs, int nj, int64_t T, bool avx512) {
  mq::WeightJob wj[mq::MAX_JOBS];
  for (int j = 0; j < nj; ++j) wj[j] = {jobs[j].lin->type, jobs[j].lin->w, jobs[j].lin->w_stride, jobs[j].lin->n, jobs[j].y};
  mq::matmul_jobs(wj, nj, jobs[0].x, T, jobs[0].lin->k, avx512);
  for (int j = 0; j < nj; ++j) {
    const MqLin& L = *jobs[j].lin;
    if (!L.bias) continue;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = 0; n < L.n; ++n) jobs[j].y[t * L.n + n] += L.bias[n];
  }
}

// out = (x * rsqrt(mean(x^2) + eps)) * w, row by row (out may be x).
void rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    float part[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16)
      for (int l = 0; l < 16; ++l) part[l] += xr[i + l] * xr[i + l];
    float ss = 0.0f;
    for (int l = 0; l < 16; ++l) ss += part[l];
    for (; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t d = 0; d < dim; ++d) o[d] = (xr[d] * inv) * w[d];
  }
}

// Rotate-half rope on the first rot dims of each head: x*cos + rotate_half(x)*sin.
void rope(float* x, int64_t T, int64_t heads, int64_t hd, int64_t rot, const float* cos, const float* sin) {
  const int64_t half = rot / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cos + t * rot;
    const float* s = sin + t * rot;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] + (-b) * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
}

inline float activate(float x, int32_t act) {
  switch (act) {
    case GELU_TANH: {
      const float k0 = 0.7978845608028654f, k1 = 0.044715f;
      return 0.5f * x * (1.0f + std::tanh(k0 * (x + k1 * x * x * x)));
    }
    case GELU: return 0.5f * x * (1.0f + std::erf(x * 0.7071067811865476f));
    default: return x / (1.0f + std::exp(-x));
  }
}

struct Scratch {
  std::vector<float> xn, q, k, v, att, a, g, u, d;
  std::vector<float> logits, probs, wsel, xe, ge, ue, ye;
  std::vector<int32_t> esel;
  std::vector<int64_t> rows;
};

// Rows [n0, n1) of y = x W^T (+ bias) for T rows of x, by the exact kernels.
void linear_rows(const MqLin& L, const float* x, int64_t T, float* y, int64_t n0, int64_t n1, bool avx512) {
  const mq::MatmulArgs a{x, L.k, T, L.k, L.w, L.w_stride, y, L.n};
#ifdef MQ_HAVE_AVX512_TU
  if (avx512)
    mq::matmul_f32_avx512(L.type, a, n0, n1);
  else
#endif
    mq::matmul_f32_scalar(L.type, a, n0, n1);
  if (L.bias)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t n = n0; n < n1; ++n) y[t * L.n + n] += L.bias[n];
}

// y = down(act(gate(x)) * up(x)) for T rows of x; g and u are [T, I] scratch.
void gated_mlp(const MqLin& gate, const MqLin& up, const MqLin& down, const float* x, int64_t T, int64_t I,
               int32_t act, float* g, float* u, float* y, bool avx512) {
#ifdef MQ_HAVE_AVX512_TU
  const bool bcast = avx512 && T >= mq::BCAST_MIN_M && T <= mq::BCAST_MAX_M;
#else
  const bool bcast = false;
#endif
  if (!bcast) {
    // One parallel range over the intermediate rows: each thread computes the same rows of
    // gate and up and applies the activation to them at once, so the activation (libm
    // expf/tanhf, ~10 ns each) is spread over the threads without a second dispatch. Every
    // output is still one kernel call's, whatever the split: same bits as separate products.
    mq::parallel_for(I, mq::grain_rows(2 * gate.k * T), [&](int64_t b, int64_t e) {
      linear_rows(gate, x, T, g, b, e, avx512);
      linear_rows(up, x, T, u, b, e, avx512);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = b; i < e; ++i) g[t * I + i] = activate(g[t * I + i], act) * u[t * I + i];
    });
  } else {
    const LinJob gu[2] = {{&gate, x, g}, {&up, x, u}};
    run_linears(gu, 2, T, avx512);
    // libm's expf/tanhf cost ~10 ns each: split the T x inter activations across threads.
    mq::parallel_for(T * I, 8192, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) g[i] = activate(g[i], act) * u[i];
    });
  }
  const LinJob dn[1] = {{&down, g, y}};
  run_linears(dn, 1, T, avx512);
}

// Indices of the k largest of v[0..n) in descending order (the first on ties, as a
// stable sort would give them).
void top_k(const float* v, int n, int k, int32_t* out) {
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int i = 0; i < n; ++i) {
      bool taken = false;
      for (int q = 0; q < j; ++q) taken |= out[q] == i;
      if (!taken && (best < 0 || v[i] > v[best])) best = i;
    }
    out[j] = best;
  }
}

void softmax(const float* x, int n, float* out) {
  float mx = x[0];
  for (int i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += (out[i] = std::exp(x[i] - mx));
  for (int i = 0; i < n; ++i) out[i] /= sum;
}

// out [T, H] = the MoE feed-forward of xn [T, H]: per expert, one gate/up and one down
// product over the rows routed to it, each row then added with its routing weight.
void moe_ffn(const MqMoE& M, const float* xn, int64_t T, int64_t H, float* out, Scratch& sc, bool avx512) {
  const int E = M.n_experts, K = M.top_k;
  const int64_t I = M.inter;
  sc.logits.resize(T * E); sc.probs.resize(E); sc.wsel.resize(T * K); sc.esel.resize(T * K);
  const LinJob r[1] = {{&M.router, xn, sc.logits.data()}};
  run_linears(r, 1, T, avx512);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = sc.logits.data() + t * E;
    int32_t* ids = sc.esel.data() + t * K;
    float* w = sc.wsel.data() + t * K;
    if (M.softmax_after_topk) {
      top_k(l, E, K, ids);
      float top[64];
      for (int j = 0; j < K; ++j) top[j] = l[ids[j]];
      softmax(top, K, w);
      continue;   // these weights sum to one already: no renormalisation or scaling (moe.route)
    } else {
      softmax(l, E, sc.probs.data());
      top_k(sc.probs.data(), E, K, ids);
      for (int j = 0; j < K; ++j) w[j] = sc.probs[ids[j]];
    }
    if (M.renormalize) {
      float sum = 0.0f;
      for (int j = 0; j < K; ++j) sum += w[j];
      for (int j = 0; j < K; ++j) w[j] = w[j] / (sum + M.renorm_eps);
    }
    if (M.routed_scale != 1.0f)
      for (int j = 0; j < K; ++j) w[j] *= M.routed_scale;
  }
  std::fill(out, out + T * H, 0.0f);
  sc.xe.resize(T * H); sc.ye.resize(T * H); sc.ge.resize(T * I); sc.ue.resize(T * I); sc.rows.resize(T * K);
  for (int e = 0; e < E; ++e) {
    int64_t n = 0;
    for (int64_t i = 0; i < T * K; ++i)
      if (sc.esel[i] == e) sc.rows[n++] = i;
    if (!n) continue;
    for (int64_t j = 0; j < n; ++j)
      std::memcpy(sc.xe.data() + j * H, xn + (sc.rows[j] / K) * H, H * sizeof(float));
    const MqLin* ex = M.experts + 3 * e;
    gated_mlp(ex[0], ex[1], ex[2], sc.xe.data(), n, I, M.act, sc.ge.data(), sc.ue.data(), sc.ye.data(), avx512);
    for (int64_t j = 0; j < n; ++j) {
      const float w = sc.wsel[sc.rows[j]];
      float* o = out + (sc.rows[j] / K) * H;
      const float* y = sc.ye.data() + j * H;
      for (int64_t d = 0; d < H; ++d) o[d] += y[d] * w;
    }
  }
}

// How the step's parallel phases run. Alone (no barrier): each phase is its own
// mq::parallel_for. In a team (decode steps): the whole step is one OpenMP region, each
// thread takes its share of a phase and waits at a barrier (mq::SpinBarrier: spins, then
// sleeps), the serial parts run on thread 0 between barriers. A SmolLM2 step has ~150 phases; a libgomp fork/join costs
// ~1 us on this class of machine against ~0.12 us for the barrier. Shares are contiguous
// ranges as parallel_for's, and every output is still computed by one kernel call, so the
// mode changes no result.
struct Phases {
  int tid = 0, n = 1;
  mq::SpinBarrier* bar = nullptr;

  // f(b, e) over this thread's share of [0, count) (chunks of at least `grain`), then a barrier.
  template <class F>
  void par(int64_t count, int64_t grain, F&& f) {
    if (!bar) return mq::parallel_for(count, grain, f);
    const int64_t chunks = std::min<int64_t>(n, (count + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1));
    if (tid < chunks) {
      const int64_t b = count * tid / chunks, e = count * (tid + 1) / chunks;
      if (b < e) guard([&] { f(b, e); });
    }
    bar->wait();
  }
  // f() on one thread, then a barrier.
  template <class F>
  void serial(F&& f) {
    if (tid == 0) guard(f);
    if (bar) bar->wait();
  }
  // In a team an exception must not skip the barriers the other threads wait at: the first
  // is kept and rethrown after the region (the rest of that step computes garbage).
  template <class F>
  void guard(F&& f) {
    if (!bar) return f();
    try {
      f();
    } catch (...) {
      bar->fail(std::current_exception());
    }
  }
};

// The jobs' products and biases as one phase (team mode; decode-sized T, no broadcast path).
void linears(Phases& P, const LinJob* jobs, int nj, int64_t T, bool avx512) {
  if (!P.bar) return run_linears(jobs, nj, T, avx512);
  int64_t offs[mq::MAX_JOBS + 1];
  offs[0] = 0;
  for (int j = 0; j < nj; ++j) offs[j + 1] = offs[j] + jobs[j].lin->n;
  P.par(offs[nj], mq::grain_rows(jobs[0].lin->k * T), [&](int64_t b, int64_t e) {
    for (int j = 0; j < nj; ++j) {
      const int64_t n0 = std::max(b, offs[j]) - offs[j], n1 = std::min(e, offs[j + 1]) - offs[j];
      if (n0 < n1) linear_rows(*jobs[j].lin, jobs[j].x, T, jobs[j].y, n0, n1, avx512);
    }
  });
}

void step_layers(const MqModel& m, const MqStep& s, Scratch& sc, Phases& P, bool avx512) {
  const int64_t T = s.T, H = m.hidden, hd = m.head_dim, nh = m.n_heads, nkv = m.n_kv, I = m.inter;
  float* h = s.h;
  const int64_t group = nh / nkv, row = nkv * hd;
  // Raw pointers: in a team (or inside parallel_for's tasks) `sc` would otherwise be read
  // from other threads while thread 0 owns it; the buffers are sized before any phase.
  float *xn = sc.xn.data(), *q = sc.q.data(), *k = sc.k.data(), *v = sc.v.data(), *att = sc.att.data();
  float *a = sc.a.data(), *d = sc.d.data(), *g = sc.g.data(), *u = sc.u.data();
  if (m.n_layers > 0) P.serial([&] { rms_norm(h, m.layers[0].in_norm, xn, T, H, m.eps); });
  for (int li = 0; li < m.n_layers; ++li) {
    const MqLayer& L = m.layers[li];
    // --- attention
    const LinJob qkv[3] = {{&L.q, xn, q}, {&L.k, xn, k}, {&L.v, xn, v}};
    linears(P, qkv, 3, T, avx512);
    P.serial([&] {
      if (L.q_norm) rms_norm(q, L.q_norm, q, T * nh, hd, m.eps);
      if (L.k_norm) rms_norm(k, L.k_norm, k, T * nkv, hd, m.eps);
      if (L.rope) {
        const float* c = L.rope == 2 ? s.cos_l : s.cos;
        const float* sn = L.rope == 2 ? s.sin_l : s.sin;
        rope(q, T, nh, hd, m.rot_dim, c, sn);
        rope(k, T, nkv, hd, m.rot_dim, c, sn);
      }
      for (int64_t t = 0; t < T; ++t) {
        if (m.kv_bf16) {
          uint16_t* kd = static_cast<uint16_t*>(L.kc) + s.slots[t] * row;
          uint16_t* vd = static_cast<uint16_t*>(L.vc) + s.slots[t] * row;
          for (int64_t i = 0; i < row; ++i) {
            kd[i] = mq::float_to_bf16(k[t * row + i]);
            vd[i] = mq::float_to_bf16(v[t * row + i]);
          }
        } else {
          std::memcpy(static_cast<float*>(L.kc) + s.slots[t] * row, k + t * row, row * sizeof(float));
          std::memcpy(static_cast<float*>(L.vc) + s.slots[t] * row, v + t * row, row * sizeof(float));
        }
      }
    });
    P.par(T * nh, 1, [&](int64_t b, int64_t e) {
      static thread_local std::vector<float> scores;
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = i / nh, head = i % nh;
        const int64_t p = s.pos[t];
        const int64_t lo = L.window > 0 ? std::max<int64_t>(0, p - L.window + 1) : 0;
        if (static_cast<int64_t>(scores.size()) < p + 1 - lo) scores.resize(p + 1 - lo);
        const mq::AttendArgs aa{L.kc, L.vc, row, (head / group) * hd, hd, s.btab + s.seq[t] * s.btab_stride,
                                m.block_size, m.scale, m.softcap, m.kv_bf16 != 0};
        const float* qv = q + (t * nh + head) * hd;
        float* out = att + (t * nh + head) * hd;
#ifdef MQ_HAVE_AVX512_TU
        if (avx512) {
          mq::attend_avx512(aa, qv, lo, p + 1, scores.data(), out);
          continue;
        }
#endif
        mq::attend_scalar(aa, qv, lo, p + 1, scores.data(), out);
      }
    });
    const LinJob o[1] = {{&L.o, att, a}};
    linears(P, o, 1, T, avx512);
    P.serial([&] {
      if (m.sandwich) {
        rms_norm(a, L.post_attn_norm, a, T, H, m.eps);
        for (int64_t i = 0; i < T * H; ++i) h[i] += a[i];
        rms_norm(h, L.pre_ffn_norm, xn, T, H, m.eps);
      } else {
        for (int64_t i = 0; i < T * H; ++i) h[i] += a[i];
        rms_norm(h, L.post_attn_norm, xn, T, H, m.eps);
      }
    });
    // --- MLP (MoE layers only alone: the team mode is not used for models with them)
    if (L.moe) {
      moe_ffn(*L.moe, xn, T, H, d, sc, avx512);
    } else if (P.bar) {
      P.par(I, mq::grain_rows(2 * L.gate.k * T), [&](int64_t b, int64_t e) {
        linear_rows(L.gate, xn, T, g, b, e, avx512);
        linear_rows(L.up, xn, T, u, b, e, avx512);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t i = b; i < e; ++i) g[t * I + i] = activate(g[t * I + i], m.act) * u[t * I + i];
      });
      const LinJob dn[1] = {{&L.down, g, d}};
      linears(P, dn, 1, T, avx512);
    } else {
      gated_mlp(L.gate, L.up, L.down, xn, T, I, m.act, g, u, d, avx512);
    }
    // The residual, then the next layer's input norm in the same serial part.
    P.serial([&] {
      if (m.sandwich) rms_norm(d, L.post_ffn_norm, d, T, H, m.eps);
      for (int64_t i = 0; i < T * H; ++i) h[i] += d[i];
      if (li + 1 < m.n_layers) rms_norm(h, m.layers[li + 1].in_norm, xn, T, H, m.eps);
    });
  }
  if (m.final_norm) P.serial([&] { rms_norm(h, m.final_norm, h, T, H, m.eps); });
}

// Steps of up to this many tokens run as a team: the row kernels' range (the 9-16-row
// broadcast kernels transpose the activations per product and keep matmul_jobs).
constexpr int64_t kTeamMaxT = 8;

int decoder_step(const MqModel& m, const MqStep& s) {
  const bool avx512 = mq::use_avx512_kernels() && !m.force_scalar;
  const int64_t T = s.T, H = m.hidden, hd = m.head_dim, nh = m.n_heads, nkv = m.n_kv, I = m.inter;
  // Per calling thread (engines of different models may step concurrently).
  static thread_local Scratch sc;
  sc.xn.resize(T * H); sc.a.resize(T * H); sc.d.resize(T * H);
  sc.q.resize(T * nh * hd); sc.att.resize(T * nh * hd);
  sc.k.resize(T * nkv * hd); sc.v.resize(T * nkv * hd);
  sc.g.resize(T * I); sc.u.resize(T * I);
  bool moe = false;
  for (int li = 0; li < m.n_layers; ++li) moe |= m.layers[li].moe != nullptr;
  // Decode-sized steps without MoE run as one team (the 9-16-row broadcast kernels and
  // the per-expert dispatch keep their own parallel loops).
  const int nt = mq::team_threads();
  if (nt > 1 && !moe && T <= kTeamMaxT) {
    mq::SpinBarrier bar;
    // A lambda does not capture a thread_local: by name, `sc` would be each worker's own.
    Scratch& mine = sc;
    mq::run_team(nt, bar, [&](int tid, int n) {
      Phases P{tid, n, &bar};
      step_layers(m, s, mine, P, avx512);
    });
    bar.rethrow();
    return 0;
  }
  Phases P;
  step_layers(m, s, sc, P, avx512);
  return 0;
}

}  // namespace

extern "C" int mq_decoder_step(const MqModel* m, const MqStep* s) {
  try {
    return decoder_step(*m, *s);
  } catch (...) {
    return 5;
  }
}
