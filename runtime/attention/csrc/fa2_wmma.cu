// FlashAttention-2 forward on CUDA's warp matrix API (WMMA): the portable CUDA kernel.
//
// WMMA (nvcuda::wmma) compiles for every GPU with tensor cores from Volta (sm_70) on, where
// Triton does not go, so this is the path FastAttention's Volta port takes: one thread block
// per BM query rows of one query head, BM/16 warps of 16 rows each; K/V tiles of BN keys
// double-buffered in shared memory (cp.async from sm_80 on, plain loads before); S = Q K^T and
// O += P V on tensor cores with float32 accumulation; the online softmax in float32 over S in
// shared memory (a warp's 16 x BN tile: two lanes per row).
//
// WMMA leaves the place of each accumulator element within a warp unspecified, but fixed for a
// fragment type. The kernel reads it once: it loads a tile whose entries are their own row
// numbers into an accumulator fragment, and so learns the row of each of a lane's elements.
// The running output O then stays in registers and is rescaled in place by its row's factor,
// instead of a round trip through shared memory per key tile.
//
// Layouts: q [n, Hq, D] with row and head strides; k, v [Hkv, N, D] with key and head strides
// (views of the paged cache); o [n, Hq, D] and lse [n, Hq] (float32, natural log). The last
// dimension is contiguous, rows are 16-byte aligned. causal: query i sees keys 0 .. i + N - n
// (the bottom-right diagonal, the top-left one where n == N). Grouped-query heads: query head h
// reads K/V head h / group.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

using namespace nvcuda;

#define DEVI __device__ __forceinline__

template <typename T> DEVI T from_float(float x);
template <> DEVI __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> DEVI __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16 bytes global -> shared; zero-filled where !valid (src is then not read)
DEVI void copy16(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(bytes));
#else
  uint4 x = valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
  *reinterpret_cast<uint4*>(dst) = x;
#endif
}
DEVI void copy_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
DEVI void copy_wait_all() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::);
#endif
}

// Fragment loads and stores from shared memory. wmma::load_matrix_sync takes a generic pointer,
// and the compiler then reads fragments with generic 32-bit loads (seen in the SASS: LD.E, four
// per fragment); PTX's wmma.load/store with the .shared state space lets ptxas use shared-memory
// loads. Same instructions' semantics and fragment layouts, any sm_70+ target.
DEVI unsigned saddr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

#define WMMA_LD4(FN, PTX)                                                          \
  template <typename F>                                                                     \
  DEVI void FN(F& f, const void* p, unsigned ldm) {                                         \
    unsigned* r = reinterpret_cast<unsigned*>(&f.x[0]);                                     \
    asm volatile(PTX " {%0, %1, %2, %3}, [%4], %5;\n"                                       \
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                           \
                 : "r"(saddr(p)), "r"(ldm));                                                \
  }
#define WMMA_LD8(FN, PTX)                                                                   \
  template <typename F>                                                                     \
  DEVI void FN(F& f, const void* p, unsigned ldm) {                                         \
    unsigned* r = reinterpret_cast<unsigned*>(&f.x[0]);                                     \
    asm volatile(PTX " {%0, %1, %2, %3, %4, %5, %6, %7}, [%8], %9;\n"                      \
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]), "=r"(r[4]), "=r"(r[5]),  \
                   "=r"(r[6]), "=r"(r[7])                                                   \
                 : "r"(saddr(p)), "r"(ldm));                                                \
  }
WMMA_LD4(ld_a_bf16, "wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16")
WMMA_LD4(ld_bcol_bf16, "wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16")
WMMA_LD4(ld_brow_bf16, "wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16")
WMMA_LD8(ld_a_f16, "wmma.load.a.sync.aligned.row.m16n16k16.shared.f16")
WMMA_LD8(ld_bcol_f16, "wmma.load.b.sync.aligned.col.m16n16k16.shared.f16")
WMMA_LD8(ld_brow_f16, "wmma.load.b.sync.aligned.row.m16n16k16.shared.f16")

template <typename T> struct Ld;
template <> struct Ld<__half> {
  template <typename F> static DEVI void a(F& f, const void* p, unsigned l) { ld_a_f16(f, p, l); }
  template <typename F> static DEVI void bcol(F& f, const void* p, unsigned l) { ld_bcol_f16(f, p, l); }
  template <typename F> static DEVI void brow(F& f, const void* p, unsigned l) { ld_brow_f16(f, p, l); }
};
template <> struct Ld<__nv_bfloat16> {
  template <typename F> static DEVI void a(F& f, const void* p, unsigned l) { ld_a_bf16(f, p, l); }
  template <typename F> static DEVI void bcol(F& f, const void* p, unsigned l) { ld_bcol_bf16(f, p, l); }
  template <typename F> static DEVI void brow(F& f, const void* p, unsigned l) { ld_brow_bf16(f, p, l); }
};

// a float32 accumulator to shared memory, row-major
template <typename F>
DEVI void st_f32(float* p, const F& f, unsigned ldm) {
  const float* x = &f.x[0];
  asm volatile(
      "wmma.store.d.sync.aligned.row.m16n16k16.shared.f32 [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, "
      "%9;\n" ::"r"(saddr(p)),
      "f"(x[0]), "f"(x[1]), "f"(x[2]), "f"(x[3]), "f"(x[4]), "f"(x[5]), "f"(x[6]), "f"(x[7]),
      "r"(ldm)
      : "memory");
}

// O's fragments times their rows' factors (factor[r] for the warp's row r; rowmap gives each of
// the lane's accumulator elements its row within a 16-row fragment)
template <int RW, int NF, int NE, typename F>
DEVI void scale_rows(F (&of)[RW][NF], const float* factor, const int (&rowmap)[NE]) {
#pragma unroll
  for (int f = 0; f < RW; ++f) {
    float a[NE];
#pragma unroll
    for (int e = 0; e < NE; ++e) a[e] = factor[f * 16 + rowmap[e]];
#pragma unroll
    for (int i = 0; i < NF; ++i)
#pragma unroll
      for (int e = 0; e < NE; ++e) of[f][i].x[e] *= a[e];
  }
}

// BM query rows per block: WARPS warps of RW * 16 rows; BN keys per softmax step, SUB steps per
// K/V tile (one barrier per SUB * BN keys); STAGES K/V buffers (2: the next tile loads while this
// one is used; 1: for GPUs with less shared memory per block, Volta's 96 KB and Turing's 64 KB,
// which load synchronously anyway)
template <int D, int BM, int RW, int BN, int SUB, int STAGES>
struct Smem {
  static constexpr int WROWS = RW * 16;          // rows per warp
  static constexpr int WARPS = BM / WROWS;
  static constexpr int LPR = 32 / WROWS;         // softmax lanes per row (1 or 2)
  static constexpr int LDH = D + 8;              // halves per row of Q, K, V (16 B pad)
  static constexpr int LDS = BN + (LPR == 1 ? 4 : 8);  // floats per row of S: float4 reads
                                                       // without bank conflicts
  static constexpr int LDP = BN + 8;             // halves per row of P
  static constexpr int Q = BM * LDH * 2;
  static constexpr int KV = 2 * STAGES * BN * SUB * LDH * 2;  // K and V, STAGES buffers each
  static constexpr int S = WARPS * WROWS * LDS * 4;
  static constexpr int P = WARPS * WROWS * LDP * 2;
  static constexpr int R = WARPS * WROWS * 4;
  static constexpr int BYTES = Q + KV + S + P + R;
};

template <typename T, int D, int BM, int RW, int BN, int SUB, int STAGES, bool QREG>
DEVI void fa2_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      T* __restrict__ o, float* __restrict__ lse, int n, int N, int hq,
                      int group, long long q_row, long long q_head, long long k_row,
                      long long k_head, long long v_row, long long v_head, long long o_row,
                      long long o_head, float scale_log2, int causal) {
  using L = Smem<D, BM, RW, BN, SUB, STAGES>;
  constexpr int KT = BN * SUB;  // keys per K/V tile
  constexpr int WARPS = L::WARPS, WROWS = L::WROWS, LPR = L::LPR, THREADS = WARPS * 32,
                LDH = L::LDH, LDS = L::LDS, LDP = L::LDP, CH = D / 8, CPL = BN / LPR;
  using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragKt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragV = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  constexpr int NE = FragAcc::num_elements;

  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + L::Q);
  T* sV = sK + STAGES * KT * LDH;
  float* sS = reinterpret_cast<float*>(smem + L::Q + L::KV);
  T* sP = reinterpret_cast<T*>(smem + L::Q + L::KV + L::S);
  float* sR = reinterpret_cast<float*>(smem + L::Q + L::KV + L::S + L::P);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int nmb = (n + BM - 1) / BM;
  const int h = blockIdx.x % hq;
  // causal: the longest rows (most keys) first, so the short ones fill the tail of the grid
  const int mb = causal ? nmb - 1 - static_cast<int>(blockIdx.x / hq) : blockIdx.x / hq;
  const int m0 = mb * BM;
  const int off = N - n;
  const T* qh = q + static_cast<long long>(h) * q_head;
  const T* kh = k + static_cast<long long>(h / group) * k_head;
  const T* vh = v + static_cast<long long>(h / group) * v_head;
  const int kend = causal ? min(N, max(0, m0 + BM + off)) : N;
  const int ntiles = (kend + KT - 1) / KT;

  for (int c = tid; c < BM * CH; c += THREADS) {
    const int r = c / CH, cc = c % CH, qi = m0 + r;
    const bool ok = qi < n;
    copy16(sQ + r * LDH + cc * 8, qh + static_cast<long long>(ok ? qi : 0) * q_row + cc * 8, ok);
  }
  auto load_kv = [&](int t, int buf) {
    T* dk = sK + buf * KT * LDH;
    T* dv = sV + buf * KT * LDH;
    for (int c = tid; c < KT * CH; c += THREADS) {
      const int r = c / CH, cc = c % CH, kj = t * KT + r;
      const bool ok = kj < N;
      const long long row = ok ? kj : 0;
      copy16(dk + r * LDH + cc * 8, kh + row * k_row + cc * 8, ok);
      copy16(dv + r * LDH + cc * 8, vh + row * v_row + cc * 8, ok);
    }
  };
  if (ntiles > 0) load_kv(0, 0);
  copy_commit();

  float* wS = sS + warp * WROWS * LDS;
  T* wP = sP + warp * WROWS * LDP;
  float* wR = sR + warp * WROWS;
  const T* wQ = sQ + warp * WROWS * LDH;
  // the row (0..15) of each of this lane's accumulator elements (see the top of the file)
  int rowmap[NE];
  {
    for (int i = lane; i < 256; i += 32) wS[(i >> 4) * LDS + (i & 15)] = static_cast<float>(i >> 4);
    __syncwarp();
    FragAcc t;
    wmma::load_matrix_sync(t, wS, LDS, wmma::mem_row_major);
#pragma unroll
    for (int e = 0; e < NE; ++e) rowmap[e] = static_cast<int>(t.x[e]);
    __syncwarp();
  }

  copy_wait_all();
  __syncthreads();
  // QREG: the warp's Q fragments stay in registers; else they are read from shared memory for
  // each key tile, which leaves the registers to the rest
  FragA qf[RW][QREG ? D / 16 : 1];
  if (QREG) {
#pragma unroll
    for (int f = 0; f < RW; ++f)
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        Ld<T>::a(qf[f][QREG ? kk : 0], wQ + f * 16 * LDH + kk * 16, LDH);
  }
  FragAcc of[RW][D / 16];
#pragma unroll
  for (int f = 0; f < RW; ++f)
#pragma unroll
    for (int i = 0; i < D / 16; ++i) wmma::fill_fragment(of[f][i], 0.0f);

  // softmax: lane -> row r of the warp's rows; its CPL columns are chunks of 4, interleaved
  // with its partner lane's where two lanes share a row
  const int r = lane / LPR, part = lane % LPR;
  const int qi = m0 + warp * WROWS + r;
  const int warp_last = m0 + warp * WROWS + WROWS - 1 + off;  // the last key this warp sees
  float m_i = -INFINITY, l_i = 0.0f;

  for (int t = 0; t < ntiles; ++t) {
    const int buf = STAGES == 2 ? (t & 1) : 0;
    if (t > 0) {
      if (STAGES == 1) {
        __syncthreads();  // every warp is done with tile t - 1: its buffer takes tile t
        load_kv(t, 0);
        copy_commit();
      }
      copy_wait_all();
      __syncthreads();  // tile t landed; (two buffers) every warp is done with tile t - 1's
    }
    if (STAGES == 2 && t + 1 < ntiles) load_kv(t + 1, buf ^ 1);
    copy_commit();
#pragma unroll 1
    for (int sub = 0; sub < SUB; ++sub) {
    const int j0 = t * KT + sub * BN;
    // every key from here on is past the end or above this warp's rows
    if (j0 >= N || (causal && j0 > warp_last)) break;
    const T* tK = sK + buf * KT * LDH + sub * BN * LDH;
    const T* tV = sV + buf * KT * LDH + sub * BN * LDH;

    {
      FragAcc sf[RW][BN / 16];
#pragma unroll
      for (int f = 0; f < RW; ++f)
#pragma unroll
        for (int jj = 0; jj < BN / 16; ++jj) wmma::fill_fragment(sf[f][jj], 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        if (!QREG) {
#pragma unroll
          for (int f = 0; f < RW; ++f)
            Ld<T>::a(qf[f][0], wQ + f * 16 * LDH + kk * 16, LDH);
        }
#pragma unroll
        for (int jj = 0; jj < BN / 16; ++jj) {
          FragKt kb;
          Ld<T>::bcol(kb, tK + jj * 16 * LDH + kk * 16, LDH);
#pragma unroll
          for (int f = 0; f < RW; ++f) wmma::mma_sync(sf[f][jj], qf[f][QREG ? kk : 0], kb, sf[f][jj]);
        }
      }
#pragma unroll
      for (int f = 0; f < RW; ++f)
#pragma unroll
        for (int jj = 0; jj < BN / 16; ++jj)
          st_f32(wS + f * 16 * LDS + jj * 16, sf[f][jj], LDS);
    }
    __syncwarp();

    const bool masked = j0 + BN > N || (causal && j0 + BN - 1 > m0 + warp * WROWS + off);
    float s[CPL];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < CPL / 4; ++i) {
      const int col = (LPR * i + part) * 4;
      const float4 x = *reinterpret_cast<const float4*>(wS + r * LDS + col);
      s[4 * i + 0] = x.x * scale_log2;
      s[4 * i + 1] = x.y * scale_log2;
      s[4 * i + 2] = x.z * scale_log2;
      s[4 * i + 3] = x.w * scale_log2;
      if (masked) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int kj = j0 + col + u;
          if (kj >= N || (causal && kj > qi + off)) s[4 * i + u] = -INFINITY;
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) mx = fmaxf(mx, s[4 * i + u]);
    }
    if (LPR == 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_i, mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with no key yet: no NaN
    const float alpha = exp2f(m_i - m_use);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < CPL / 4; ++i) {
      const int col = (LPR * i + part) * 4;
      T p4[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float p = exp2f(s[4 * i + u] - m_use);
        sum += p;
        p4[u] = from_float<T>(p);
      }
      *reinterpret_cast<uint2*>(wP + r * LDP + col) = *reinterpret_cast<const uint2*>(p4);
    }
    if (LPR == 2) sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_i = l_i * alpha + sum;
    m_i = m_new;
    // rescale O only where some row's maximum moved (later tiles mostly leave it)
    const bool rescale = __any_sync(0xffffffffu, alpha != 1.0f);
    if (rescale && part == 0) wR[r] = alpha;
    __syncwarp();

    if (rescale) scale_rows<RW, D / 16, NE>(of, wR, rowmap);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      FragA pa[RW];
#pragma unroll
      for (int f = 0; f < RW; ++f) Ld<T>::a(pa[f], wP + f * 16 * LDP + kk * 16, LDP);
#pragma unroll
      for (int nn = 0; nn < D / 16; ++nn) {
        FragV vb;
        Ld<T>::brow(vb, tV + kk * 16 * LDH + nn * 16, LDH);
#pragma unroll
        for (int f = 0; f < RW; ++f) wmma::mma_sync(of[f][nn], pa[f], vb, of[f][nn]);
      }
    }
    __syncwarp();  // the next step overwrites this warp's S, P and factors
    }
  }

  // O / l, and lse = ln(sum exp(s)) = m ln 2 + ln l (m is in log2 units)
  if (part == 0) {
    wR[r] = l_i > 0.0f ? 1.0f / l_i : 0.0f;
    if (qi < n)
      lse[static_cast<long long>(qi) * hq + h] =
          l_i > 0.0f ? m_i * 0.69314718055994531f + logf(l_i) : -INFINITY;
  }
  __syncwarp();
  scale_rows<RW, D / 16, NE>(of, wR, rowmap);
  T* orow = o + static_cast<long long>(qi) * o_row + static_cast<long long>(h) * o_head;
#pragma unroll
  for (int p = 0; p < D / BN; ++p) {
#pragma unroll
    for (int f = 0; f < RW; ++f)
#pragma unroll
      for (int jj = 0; jj < BN / 16; ++jj)
        st_f32(wS + f * 16 * LDS + jj * 16, of[f][p * (BN / 16) + jj], LDS);
    __syncwarp();
    if (qi < n) {
#pragma unroll
      for (int i = 0; i < CPL / 4; ++i) {
        const int col = (LPR * i + part) * 4;
        const float4 x = *reinterpret_cast<const float4*>(wS + r * LDS + col);
        T o4[4] = {from_float<T>(x.x), from_float<T>(x.y), from_float<T>(x.z), from_float<T>(x.w)};
        *reinterpret_cast<uint2*>(orow + p * BN + col) = *reinterpret_cast<const uint2*>(o4);
      }
    }
    __syncwarp();
  }
}

#define FA2_SMEM(D, BM, RW, BN, SUB, STAGES) Smem<D, BM, RW, BN, SUB, STAGES>
#define FA2_KERNEL(NAME, T, D, BM, RW, BN, SUB, STAGES, QREG)                                    \
  extern "C" __global__ void __launch_bounds__(                                                  \
      FA2_SMEM(D, BM, RW, BN, SUB, STAGES)::WARPS * 32,                                          \
      2 * FA2_SMEM(D, BM, RW, BN, SUB, STAGES)::BYTES <= 227 * 1024 ? 2 : 1)                    \
      NAME(const T* q, const T* k, const T* v, T* o, float* lse, int n, int N, int hq,          \
           int group, long long q_row, long long q_head, long long k_row, long long k_head,      \
           long long v_row, long long v_head, long long o_row, long long o_head,                 \
           float scale_log2, int causal) {                                                       \
    fa2_forward<T, D, BM, RW, BN, SUB, STAGES, QREG>(q, k, v, o, lse, n, N, hq, group, q_row,   \
                                                     q_head, k_row, k_head, v_row, v_head,       \
                                                     o_row, o_head, scale_log2, causal);         \
  }                                                                                              \
  extern "C" __global__ void NAME##_smem(int* out) {                                             \
    *out = FA2_SMEM(D, BM, RW, BN, SUB, STAGES)::BYTES;                                          \
  }

// fa2_<dtype>_d<head dim>_m<rows per block>_r<16-row fragments per warp>_n<keys per step>
// [_s<steps per K/V tile>][_b1: one K/V buffer][_qs: Q read from shared memory per key tile]
#define FA2_KERNELS(DT, T)                                                         \
  FA2_KERNEL(fa2_##DT##_d64_m128_r2_n64, T, 64, 128, 2, 64, 1, 2, true)            \
  FA2_KERNEL(fa2_##DT##_d64_m128_r2_n32_s2, T, 64, 128, 2, 32, 2, 2, true)         \
  FA2_KERNEL(fa2_##DT##_d64_m128_r2_n32_b1, T, 64, 128, 2, 32, 1, 1, true)         \
  FA2_KERNEL(fa2_##DT##_d128_m128_r2_n32_qs, T, 128, 128, 2, 32, 1, 2, false)      \
  FA2_KERNEL(fa2_##DT##_d128_m64_r1_n64, T, 128, 64, 1, 64, 1, 2, true)            \
  FA2_KERNEL(fa2_##DT##_d128_m256_r2_n32_qs, T, 128, 256, 2, 32, 1, 2, false)      \
  FA2_KERNEL(fa2_##DT##_d128_m128_r2_n32_b1_qs, T, 128, 128, 2, 32, 1, 1, false)   \
  FA2_KERNEL(fa2_##DT##_d128_m64_r2_n32_b1_qs, T, 128, 64, 2, 32, 1, 1, false)

FA2_KERNELS(f16, __half)
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // bfloat16 tensor cores: sm_80 on
FA2_KERNELS(bf16, __nv_bfloat16)
#endif
