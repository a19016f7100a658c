// FlashAttention-2 forward for CPUs in float32: one fused pass per tile of query rows, the
// scores never leaving registers before they are probabilities.
//
// Layout: the lanes of a vector are query rows, not head dims. A work item is one K/V head and
// a block of query positions; its rows are (position, query head of the group) pairs, so the
// query heads that share a K/V head share every key load (GQA). With rows in the lanes
//   * S^T = K Q^T is a rank-1 update per head dim: a broadcast key element times a vector of
//     query elements (Q^T packed once per item, pre-scaled by scale * log2 e);
//   * the softmax runs down the keys, lane-wise: no horizontal reduction anywhere;
//   * O^T += V^T P^T is again a broadcast value element times one key's probabilities.
// The exponentials are taken in registers right after the products, against a running max
// that is raised only when a score exceeds it by more than 2^TAU (then the row tile's O, sum
// and this block's probabilities are rescaled; after the first keys that is rare), so the
// scores are never stored and read back for a separate max pass.
//
// torch's CPU kernel runs the two products as GEMM calls on tiles with the softmax in passes
// over a tile of scores in memory between them; with small head dims (32, 64) those GEMMs have
// a short inner dimension and the passes cost about as much as the products.
//
// Causal is top-left (query i sees keys 0..i; n == N), as the backend asks for it. Any strides
// for the token and head dims; the head dim is contiguous. Built with -march=native: AVX-512
// gives 16 lanes, anything else 8 (AVX2, or NEON pairs).

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
constexpr int VW = 16;
constexpr int RV = 3;  // row vectors per register tile: RV * KJ (and RV * DJ) accumulators
constexpr int KJ = 8;  // keys per register tile of S^T
constexpr int DJ = 8;  // head dims per register tile of O^T
#else
constexpr int VW = 8;
constexpr int RV = 2;
constexpr int KJ = 4;
constexpr int DJ = 4;
#endif
constexpr int RB = VW * RV;  // rows per register tile
constexpr int BN = 64;       // keys per block (a multiple of KJ)
// Rows an item aims at: each item reads its K/V head's keys once, so more rows mean fewer
// passes over K/V (which outgrow L2 at long lengths); 96 -> 288 gained 5-15 % at head dims 32
// to 128 on the 2-core Xeon (scripts/bench_cpu_attention.py), the tiles then living in L2.
constexpr int ROWS = 288;

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
constexpr float NEG = -1e30f;  // a masked score, and the max before any key
constexpr float TAU = 8.0f;    // raise the running max only when it is exceeded by this (log2)

static inline vf ld(const float* p) { return *reinterpret_cast<const vf*>(p); }
static inline void st(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
static inline vf splat(float x) { return vf{} + x; }
static inline vf vmax(vf a, vf b) { return a > b ? a : b; }
static inline bool any_gt(vf a, vf b) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GT_OQ) != 0;
#else
  const vi gt = a > b;
  int32_t lanes[VW];
  std::memcpy(lanes, &gt, sizeof(lanes));
  int32_t any = 0;
  for (int i = 0; i < VW; ++i) any |= lanes[i];
  return any != 0;
#endif
}

// 2^x for x <= 0, exactly 0 below -126 (no denormals): x = n + f with n an integer and f in
// [-0.5, 0.5], 2^f by its Taylor polynomial of degree 6 (relative error below 1.3e-7).
static inline vf exp2v(vf x) {
#if defined(__AVX512F__)
  const __m512 xx = (__m512)x;
  const __mmask16 keep = _mm512_cmp_ps_mask(xx, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  const __m512 n = _mm512_roundscale_ps(xx, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf f = (vf)_mm512_sub_ps(xx, n);
#else
  const vi keep = x >= -126.0f;
  x = vmax(x, splat(-126.0f));
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x + magic) - magic;
  const vf f = x - n;
#endif
  vf p = splat(1.5403530393381606e-04f);
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
#if defined(__AVX512F__)
  return (vf)_mm512_maskz_scalef_ps(keep, (__m512)p, n);
#else
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return reinterpret_cast<vf>(reinterpret_cast<vi>(p * reinterpret_cast<vf>(e)) & keep);
#endif
}

struct Args {
  const float *q, *k, *v;
  int64_t q_sn, q_sh, k_sn, k_sh, v_sn, v_sh, o_sn, o_sh;
  float *o, *lse;  // lse [n, Hq] contiguous
  int n, N, Hq, Hkv, causal;
  float scale;
};

struct Scratch {
  float *qt, *ot, *p, *kp, *vp, *m, *l, *lim;
};

static float* grab(size_t floats) {
  return static_cast<float*>(std::aligned_alloc(64, (floats * 4 + 63) / 64 * 64));
}

template <int D>
struct Kernel {

  // Row tile [rb, rb + RB) over the block's keys [j0, j0 + nbp) (nbp a multiple of KJ, keys
  // past a row's limit masked): probabilities into p, then O^T += V^T P^T.
  template <bool MASK>
  static void tile(const Scratch& w, int R, int rb, int j0, int nbp) {
    float* m = w.m + rb;
    float* l = w.l + rb;
    for (int jg = 0; jg < nbp; jg += KJ) {
      vf acc[KJ][RV] = {};
      const float* qt = w.qt + rb;
      const float* kp = w.kp + jg * D;
      for (int d = 0; d < D; ++d, qt += R) {
        vf qv[RV];
        for (int u = 0; u < RV; ++u) qv[u] = ld(qt + u * VW);
        for (int t = 0; t < KJ; ++t) {
          const float kv = kp[t * D + d];
          for (int u = 0; u < RV; ++u) acc[t][u] += qv[u] * kv;
        }
      }
      for (int u = 0; u < RV; ++u) {
        if (MASK) {
          const vf lim = ld(w.lim + rb + u * VW);
          for (int t = 0; t < KJ; ++t)
            acc[t][u] = splat((float)(j0 + jg + t)) > lim ? splat(NEG) : acc[t][u];
        }
        vf mx = acc[0][u];
        for (int t = 1; t < KJ; ++t) mx = vmax(mx, acc[t][u]);
        vf mu = ld(m + u * VW);
        if (__builtin_expect(any_gt(mx, mu + TAU), 0)) {
          // a score above the running max by more than 2^TAU: raise it, rescaling what was
          // summed against the old one (O^T, the sum, this block's probabilities so far)
          const vf mn = vmax(mu, mx);
          const vf al = exp2v(mu - mn);
          float* o = w.ot + rb + u * VW;
          for (int d = 0; d < D; ++d) st(o + (int64_t)d * R, ld(o + (int64_t)d * R) * al);
          for (int j = 0; j < jg; ++j) {
            float* pj = w.p + (int64_t)j * R + rb + u * VW;
            st(pj, ld(pj) * al);
          }
          st(l + u * VW, ld(l + u * VW) * al);
          st(m + u * VW, mn);
          mu = mn;
        }
        vf sum = ld(l + u * VW);
        for (int t = 0; t < KJ; ++t) {
          const vf pr = exp2v(acc[t][u] - mu);
          st(w.p + (int64_t)(jg + t) * R + rb + u * VW, pr);
          sum += pr;
        }
        st(l + u * VW, sum);
      }
    }
    for (int d0 = 0; d0 < D; d0 += DJ) {
      vf acc[DJ][RV];
      float* o = w.ot + (int64_t)d0 * R + rb;
      for (int t = 0; t < DJ; ++t)
        for (int u = 0; u < RV; ++u) acc[t][u] = ld(o + (int64_t)t * R + u * VW);
      const float* pj = w.p + rb;
      const float* vp = w.vp + d0;
      for (int j = 0; j < nbp; ++j, pj += R, vp += D) {
        vf pv[RV];
        for (int u = 0; u < RV; ++u) pv[u] = ld(pj + u * VW);
        for (int t = 0; t < DJ; ++t) {
          const float vv = vp[t];
          for (int u = 0; u < RV; ++u) acc[t][u] += pv[u] * vv;
        }
      }
      for (int t = 0; t < DJ; ++t)
        for (int u = 0; u < RV; ++u) st(o + (int64_t)t * R + u * VW, acc[t][u]);
    }
  }

  // One K/V head h and query positions [i0, i1).
  static void item(const Args& a, const Scratch& w, int h, int i0, int i1) {
    const int G = a.Hq / a.Hkv;
    const int rows = (i1 - i0) * G;
    const int R = (rows + RB - 1) / RB * RB;
    const float qs = a.scale * LOG2E;
    for (int r = 0; r < R; ++r) {
      const bool real = r < rows;
      const int i = real ? i0 + r / G : i1 - 1;
      w.lim[r] = (float)(a.causal ? i : a.N - 1);  // the last key the row sees
      w.m[r] = NEG;
      w.l[r] = 0.0f;
      const float* qr =
          a.q + (int64_t)i * a.q_sn + (int64_t)(h * G + (real ? r % G : 0)) * a.q_sh;
      for (int d = 0; d < D; ++d) {
        w.qt[(int64_t)d * R + r] = real ? qr[d] * qs : 0.0f;
        w.ot[(int64_t)d * R + r] = 0.0f;
      }
    }
    const float* kh = a.k + (int64_t)h * a.k_sh;
    const float* vh = a.v + (int64_t)h * a.v_sh;
    const int kend = a.causal ? i1 : a.N;
    for (int j0 = 0; j0 < kend; j0 += BN) {
      const int nb = std::min(BN, kend - j0);
      const int nbp = (nb + KJ - 1) / KJ * KJ;
      // this block's keys and values, packed [nbp, D] (L1-resident; the padding is zero and
      // masked) so every load in the register tiles is at a constant offset
      for (int j = 0; j < nbp; ++j) {
        if (j < nb) {
          std::memcpy(w.kp + j * D, kh + (int64_t)(j0 + j) * a.k_sn, D * 4);
          std::memcpy(w.vp + j * D, vh + (int64_t)(j0 + j) * a.v_sn, D * 4);
        } else {
          std::memset(w.kp + j * D, 0, D * 4);
          std::memset(w.vp + j * D, 0, D * 4);
        }
      }
      // masking is needed where a key of the block is past the smallest limit of the item
      const bool mask = j0 + nbp - 1 > (a.causal ? i0 : a.N - 1);
      for (int rb = 0; rb < R; rb += RB) {
        if (mask)
          tile<true>(w, R, rb, j0, nbp);
        else
          tile<false>(w, R, rb, j0, nbp);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int i = i0 + r / G, hq = h * G + r % G;
      const float inv = 1.0f / w.l[r];
      float* orow = a.o + (int64_t)i * a.o_sn + (int64_t)hq * a.o_sh;
      for (int d = 0; d < D; ++d) orow[d] = w.ot[(int64_t)d * R + r] * inv;
      a.lse[(int64_t)i * a.Hq + hq] = w.m[r] * LN2 + std::log(w.l[r]);
    }
  }

  static int run(const Args& a, int threads) {
    const int G = a.Hq / a.Hkv;
    // query positions per item: rows (positions x group) a multiple of RB where it can be
    const int unit = RB / std::__gcd(RB, G);
    const int bq = unit * std::max(1, ROWS / (unit * G));
    const int R = (bq * G + RB - 1) / RB * RB;
    const int blocks = (a.n + bq - 1) / bq;
    const int items = blocks * a.Hkv;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
      Scratch w{grab((size_t)D * R), grab((size_t)D * R), grab((size_t)BN * R),
                grab((size_t)BN * D), grab((size_t)BN * D), grab(R), grab(R), grab(R)};
      const bool ok = w.qt && w.ot && w.p && w.kp && w.vp && w.m && w.l && w.lim;
      // causal: the longest rows (last query blocks) first, so the tail is short items
#pragma omp for schedule(dynamic, 1)
      for (int it = 0; it < items; ++it) {
        if (!ok) {  // every thread reaches this loop; one without scratch does no item
#pragma omp atomic write
          failed = 3;
          continue;
        }
        const int b = a.causal ? blocks - 1 - it / a.Hkv : it / a.Hkv;
        item(a, w, it % a.Hkv, b * bq, std::min(a.n, (b + 1) * bq));
      }
      for (float* p : {w.qt, w.ot, w.p, w.kp, w.vp, w.m, w.l, w.lim}) std::free(p);
    }
    return failed;
  }
};

// ``threads``: torch's intra-op count, passed because an OpenMP region opened from a thread torch
// did not start would take the default (every core), not torch.set_num_threads'.
// Returns 0, or: 1 bad shape, 2 causal with n != N, 3 out of memory, 4 unsupported head dim.
extern "C" int tilerun_fa2_cpu_f32(const float* q, int64_t q_sn, int64_t q_sh, const float* k,
                                   int64_t k_sn, int64_t k_sh, const float* v, int64_t v_sn,
                                   int64_t v_sh, float* o, int64_t o_sn, int64_t o_sh, float* lse,
                                   int n, int N, int Hq, int Hkv, int D, int causal, float scale,
                                   int threads) {
  if (n <= 0 || N <= 0 || Hkv <= 0 || Hq % Hkv != 0 || threads <= 0) return 1;
  if (causal && n != N) return 2;
  const Args a{q, k, v, q_sn, q_sh, k_sn, k_sh, v_sn, v_sh, o_sn, o_sh, o, lse,
               n, N, Hq, Hkv, causal, scale};
  switch (D) {
    case 32: return Kernel<32>::run(a, threads);
    case 64: return Kernel<64>::run(a, threads);
    case 80: return Kernel<80>::run(a, threads);
    case 96: return Kernel<96>::run(a, threads);
    case 128: return Kernel<128>::run(a, threads);
    case 256: return Kernel<256>::run(a, threads);
    default: return 4;
  }
}

// The head dims compiled in (the backend hands others to torch's kernel).
extern "C" int tilerun_fa2_cpu_head_dim_ok(int D) {
  return D == 32 || D == 64 || D == 80 || D == 96 || D == 128 || D == 256;
}

extern "C" int tilerun_fa2_cpu_lanes() { return VW; }

// Query rows per register tile: calls with fewer rows leave lanes idle (the backend hands
// them to torch's kernel).
extern "C" int tilerun_fa2_cpu_tile_rows() { return RB; }
