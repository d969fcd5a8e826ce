// Flash attention kernels (see cuda_flash.h for the contract).
//
// Tensor-core family (bf16 / f16), per warp one or two 16-row slices, mma.sync m16n8k16 with f32
// accumulators. Scores live in the log2 domain: s2 = (q·k·scale + mask)·log2(e), so that
// P = exp2(s2 − m2) and the stored log-sum-exp (natural log) is (m2 + log2 l)·ln 2.
//   forward   block = (128 queries for d ≤ 80 — two 16-row slices per warp —, else 64; row n);
//             loops over key tiles of 64, cp.async double-buffered (tile it + 1 is copied
//             while tile it is used); the head dim is padded with zeros to a multiple of 16 in
//             shared memory only (QKᵀ's k-dim); P·V runs over the exact head dim in steps of 8.
//   backward  block = (64 keys, row n, a share of the query tiles); per query tile (Q, dO,
//             lse, delta cp.async double-buffered):
//             Sᵀ = K·Qᵀ, Pᵀ, dVᵀ += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − D), dK += dSᵀ·Q,
//             dS to shared memory, dQ += dS·K; dQ, dK, dV added into f32 buffers (atomics).
//   Interior tiles (no mask, every key in range, wholly below the causal diagonal) skip the
//   per-element bounds / causal / mask code.
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane/4, t = lane%4):
//   A 16×16 row-major: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16×8 (k×n):      b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C 16×8:            c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
// A C tile pair (columns 16kk..16kk+15) is exactly the A fragment of k-step kk, so P and dS
// go from accumulators to the next product without shared memory. A and B fragments come
// from shared memory through ldmatrix.x4 (.trans for the row-major [k][n] operands V, dO, Q,
// K of P·V, dV, dK, dQ). Shared-memory rows are padded to (dp + 8) elements: the 8 rows of
// one ldmatrix matrix then fall into distinct banks.
// Performance notes and measurements: docs/flash-notes.md.
//
// Exact family (f32 / f64): one thread per query row (forward, dQ) or per key row (dK, dV),
// tiles of the other side staged in shared memory; the CPU flash algorithm, in FMA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_flash.h"

namespace loom::cuda {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ================================ tensor-core family =================================

template <typename T>
struct Half2;
template <>
struct Half2<__nv_bfloat16> {
  static __device__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Half2<__half> {
  static __device__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ float to_float(__half x) { return __half2float(x); }
  static __device__ __half from_float(float x) { return __float2half_rn(x); }
};

// c += a·b, 16×8×16, f32 accumulators.
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The B fragment (k 16 × n 8) of a row-major [k][n] tile in shared memory, rows `row0`…,
// columns `col0`…, row stride `ld`: ldmatrix.x2.trans (lanes 0–15 give the row addresses).
template <typename T>
__device__ __forceinline__ void ldmatrix_b_trans(uint32_t* b, const T* base, int row0, int col0, int ld, int lane) {
  const T* p = base + (row0 + (lane & 15)) * ld + col0;
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(addr));
}

// ldmatrix.x4 forms (lane l gives the address of row l % 8 of matrix l / 8); each replaces
// four 32-bit shared loads. Rows are 16-byte aligned and, with the (dp + 8) padding, the 8
// rows of one matrix fall into 8 distinct 16-byte bank groups.
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t* r, const void* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// The A fragment (rows row0…row0+15, k0…k0+15) of a row-major [m][k] tile.
template <typename T>
__device__ __forceinline__ void ldsm_a(uint32_t* a, const T* base, int row0, int k0, int ld, int lane) {
  ldsm_x4(a, base + (row0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}
// Two B fragments (k0…k0+15; n-blocks n0…n0+7 → b[0..1], n0+8…n0+15 → b[2..3]) whose
// transpose is a row-major [n][k] tile.
template <typename T>
__device__ __forceinline__ void ldsm_b_pair(uint32_t* b, const T* base, int n0, int k0, int ld, int lane) {
  ldsm_x4(b, base + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + k0 + ((lane >> 3) & 1) * 8);
}
// Two B fragments (k0…k0+15; n0…n0+7 → b[0..1], n0+8…n0+15 → b[2..3]) of a row-major [k][n] tile.
template <typename T>
__device__ __forceinline__ void ldsm_b_trans_pair(uint32_t* b, const T* base, int k0, int n0, int ld, int lane) {
  ldsm_x4_trans(b, base + (k0 + (lane & 15)) * ld + n0 + (lane >> 4) * 8);
}

// 2^x (ex2.approx, ≤ 2 ulp; −inf → 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte asynchronous global → shared copy (L2 only); zero-fills when !in.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool in) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(in ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// 4-byte asynchronous copy; zero-fills when !in.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool in) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(addr), "l"(src), "r"(in ? 4 : 0));
}

// p[0] += a, p[1] += b (one vector atomic on sm_90; p 8-byte aligned).
__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// Copies rows [r0, r0 + rows) of a [len, d] matrix into a [rows][ld] tile with cp.async, zero
// beyond len and in columns d…DP (16-byte chunks; d is a multiple of 8); the copy lands after
// cp_async_commit, cp_async_wait_all and __syncthreads.
template <typename T, int DP>
__device__ __forceinline__ void load_tile_async(T* tile, int ld, const T* src, int64_t r0, int rows, int64_t len,
                                                int d, int tid, int threads) {
  constexpr int kChunks = DP / 8;
  for (int idx = tid; idx < rows * kChunks; idx += threads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool in = r0 + r < len && c < d;
    cp_async16(tile + r * ld + c, in ? src + (r0 + r) * d + c : src, in);
  }
}

template <int D>
struct TcShape {
  static constexpr int kDp = (D + 15) / 16 * 16;  // QKᵀ's k-dim, zero-padded in shared memory
  static constexpr int kLd = kDp + 8;             // shared-memory row stride (elements)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 64;                // queries per tile (16 per warp)
  static constexpr int kCols = 64;                // keys per tile
};

// The additive mask entry (query qi, key kj) of problem row n, in the log2 domain.
template <typename T>
__device__ __forceinline__ float mask_log2(const FlashParams& p, const T* mask, int64_t n, int64_t qi, int64_t kj) {
  const int64_t b = p.mask_batches == 1 ? 0 : n / p.heads;
  const int64_t r = p.mask_rows == 1 ? 0 : qi;
  return Half2<T>::to_float(mask[(b * p.mask_rows + r) * p.k_len + kj]) * kLog2e;
}

// The forward's query tile: kAtoms 16-row slices per warp. Two for d ≤ 80 (each K/V fragment
// read from shared memory feeds two mma: the loop is no longer bound by shared-memory
// bandwidth), one above (registers). Q's fragments stay in registers for d ≤ 64 and with one
// slice; for d = 72, 80 they are re-read per key tile (else ptxas spills).
template <int D>
struct TcFwdShape {
  static constexpr int kAtoms = D <= 80 ? 2 : 1;
  static constexpr int kRows = TcShape<D>::kWarps * 16 * kAtoms;
  static constexpr bool kQInRegs = D <= 64 || kAtoms == 1;
};

template <typename T, int D>
__global__ void __launch_bounds__(TcShape<D>::kThreads) flash_fwd_tc_kernel(const FlashParams p) {
  using S = TcShape<D>;
  constexpr int kDp = S::kDp, kLd = S::kLd, kCols = S::kCols;
  constexpr int kAtoms = TcFwdShape<D>::kAtoms, kRows = TcFwdShape<D>::kRows;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK0 = sQ + kRows * kLd;  // K and V, two buffers each: [buf][kCols][kLd]
  T* sV0 = sK0 + 2 * kCols * kLd;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t n = blockIdx.y, i0 = int64_t(blockIdx.x) * kRows;
  const T* q = static_cast<const T*>(p.q) + n * p.q_len * D;
  const T* k = static_cast<const T*>(p.k) + n * p.k_len * D;
  const T* v = static_cast<const T*>(p.v) + n * p.k_len * D;
  const T* mask = static_cast<const T*>(p.mask);
  const float sl2 = float(p.scale) * kLog2e;

  // key tiles [0, tiles): with causal, those whose first key is ≤ the tile's last query
  int64_t tiles = (p.k_len + kCols - 1) / kCols;
  if (p.causal) tiles = min(tiles, (i0 + kRows - 1) / kCols + 1);

  // Q and the first K/V tile in one cp.async group; tile it + 1 is copied while tile it is used.
  load_tile_async<T, kDp>(sQ, kLd, q, i0, kRows, p.q_len, D, tid, S::kThreads);
  if (tiles > 0) {
    load_tile_async<T, kDp>(sK0, kLd, k, 0, kCols, p.k_len, D, tid, S::kThreads);
    load_tile_async<T, kDp>(sV0, kLd, v, 0, kCols, p.k_len, D, tid, S::kThreads);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  // slice a of this warp: rows warp·16·kAtoms + 16a …; its Q fragments stay in registers
  // when they fit (kQInRegs), else they are re-read from shared memory per tile
  constexpr bool kQInRegs = TcFwdShape<D>::kQInRegs;
  uint32_t qf[kQInRegs ? kAtoms : 1][kQInRegs ? kDp / 16 : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int a = 0; a < kAtoms; ++a)
#pragma unroll
      for (int kk = 0; kk < kDp / 16; ++kk) ldsm_a(qf[a][kk], sQ, (warp * kAtoms + a) * 16, kk * 16, kLd, lane);
  }

  float o[kAtoms][D / 8][4];
#pragma unroll
  for (int a = 0; a < kAtoms; ++a)
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[a][j][0] = o[a][j][1] = o[a][j][2] = o[a][j][3] = 0.f;
  float m[kAtoms][2], l[kAtoms][2];
  int64_t row_q[kAtoms][2];
#pragma unroll
  for (int a = 0; a < kAtoms; ++a) {
    m[a][0] = m[a][1] = -INFINITY, l[a][0] = l[a][1] = 0.f;
    row_q[a][0] = i0 + (warp * kAtoms + a) * 16 + g, row_q[a][1] = row_q[a][0] + 8;
  }

  for (int64_t it = 0; it < tiles; ++it) {
    const int64_t j0 = it * kCols;
    const int buf = int(it & 1);
    const T* sK = sK0 + buf * kCols * kLd;
    const T* sV = sV0 + buf * kCols * kLd;
    cp_async_wait_all();
    __syncthreads();  // tile it landed for all threads; every warp is done with tile it − 1
    if (it + 1 < tiles) {
      load_tile_async<T, kDp>(sK0 + (buf ^ 1) * kCols * kLd, kLd, k, j0 + kCols, kCols, p.k_len, D, tid, S::kThreads);
      load_tile_async<T, kDp>(sV0 + (buf ^ 1) * kCols * kLd, kLd, v, j0 + kCols, kCols, p.k_len, D, tid, S::kThreads);
    }
    cp_async_commit();

    float s[kAtoms][kCols / 8][4];
#pragma unroll
    for (int a = 0; a < kAtoms; ++a)
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j) s[a][j][0] = s[a][j][1] = s[a][j][2] = s[a][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kDp / 16; ++kk) {
      uint32_t qa[kAtoms][4];
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) {
        if constexpr (kQInRegs) {
#pragma unroll
          for (int r = 0; r < 4; ++r) qa[a][r] = qf[a][kk][r];
        } else {
          ldsm_a(qa[a], sQ, (warp * kAtoms + a) * 16, kk * 16, kLd, lane);
        }
      }
#pragma unroll
      for (int j = 0; j < kCols / 8; j += 2) {
        uint32_t b[4];
        ldsm_b_pair(b, sK, j * 8, kk * 16, kLd, lane);
#pragma unroll
        for (int a = 0; a < kAtoms; ++a) {
          mma16816(s[a][j], qa[a], b, T());
          mma16816(s[a][j + 1], qa[a], b + 2, T());
        }
      }
    }
    // scale; on the last / diagonal tiles and with a mask also bounds, causal and mask
    const bool plain = !mask && j0 + kCols <= p.k_len && (!p.causal || j0 + kCols - 1 <= i0);
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) {
      if (plain) {
#pragma unroll
        for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[a][j][e] *= sl2;
      } else {
#pragma unroll
        for (int j = 0; j < kCols / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t kj = j0 + j * 8 + 2 * t + (e & 1), qi = row_q[a][e / 2];
            float x = s[a][j][e] * sl2;
            if (kj >= p.k_len || (p.causal && kj > qi)) x = -INFINITY;
            else if (mask && qi < p.q_len) x += mask_log2(p, mask, n, qi, kj);
            s[a][j][e] = x;
          }
        }
      }
      // the online softmax of rows g (h = 0) and g + 8 (h = 1)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kCols / 8; ++j) mx = fmaxf(mx, fmaxf(s[a][j][2 * h], s[a][j][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[a][h], mx);
        const float shift = m_new == -INFINITY ? 0.f : m_new;  // a row masked so far keeps P = 0
        const float corr = fast_exp2(m[a][h] - shift);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kCols / 8; ++j) {
          s[a][j][2 * h] = fast_exp2(s[a][j][2 * h] - shift);
          s[a][j][2 * h + 1] = fast_exp2(s[a][j][2 * h + 1] - shift);
          sum += s[a][j][2 * h] + s[a][j][2 * h + 1];
        }
        l[a][h] = l[a][h] * corr + sum;  // this thread's share of the row; summed over the 4 lanes at the end
        m[a][h] = m_new;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) o[a][j][2 * h] *= corr, o[a][j][2 * h + 1] *= corr;
      }
    }
    // O += P·V, P straight from the accumulators
#pragma unroll
    for (int kk = 0; kk < kCols / 16; ++kk) {
      uint32_t pa[kAtoms][4];
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) {
        pa[a][0] = Half2<T>::pack(s[a][2 * kk][0], s[a][2 * kk][1]);
        pa[a][1] = Half2<T>::pack(s[a][2 * kk][2], s[a][2 * kk][3]);
        pa[a][2] = Half2<T>::pack(s[a][2 * kk + 1][0], s[a][2 * kk + 1][1]);
        pa[a][3] = Half2<T>::pack(s[a][2 * kk + 1][2], s[a][2 * kk + 1][3]);
      }
#pragma unroll
      for (int j = 0; j + 1 < D / 8; j += 2) {
        uint32_t b[4];
        ldsm_b_trans_pair(b, sV, kk * 16, j * 8, kLd, lane);
#pragma unroll
        for (int a = 0; a < kAtoms; ++a) {
          mma16816(o[a][j], pa[a], b, T());
          mma16816(o[a][j + 1], pa[a], b + 2, T());
        }
      }
      if constexpr (D / 8 % 2 == 1) {
        uint32_t b[2];
        ldmatrix_b_trans(b, sV, kk * 16, (D / 8 - 1) * 8, kLd, lane);
#pragma unroll
        for (int a = 0; a < kAtoms; ++a) mma16816(o[a][D / 8 - 1], pa[a], b, T());
      }
    }
  }

  T* out = static_cast<T*>(p.out) + n * p.q_len * D;
  float* lse = static_cast<float*>(p.lse) + n * p.q_len;
#pragma unroll
  for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[a][h] += __shfl_xor_sync(0xffffffffu, l[a][h], 1);
      l[a][h] += __shfl_xor_sync(0xffffffffu, l[a][h], 2);
      const int64_t qi = row_q[a][h];
      if (qi >= p.q_len) continue;
      const float inv = 1.f / l[a][h];
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const uint32_t packed = Half2<T>::pack(o[a][j][2 * h] * inv, o[a][j][2 * h + 1] * inv);
        *reinterpret_cast<uint32_t*>(out + qi * D + j * 8 + 2 * t) = packed;
      }
      if (t == 0) lse[qi] = (m[a][h] + log2f(l[a][h])) * kLn2;
    }
  }
}

// delta[r] = Σ_c dO[r, c]·O[r, c] in f32, one warp per row; also zeroes nothing else.
template <typename T, typename Acc>
__global__ void flash_delta_kernel(const T* dout, const T* out, Acc* delta, int64_t rows, int d) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  Acc sum = 0;
  for (int c = lane; c < d; c += 32) sum += Acc(dout[r * d + c]) * Acc(out[r * d + c]);
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) delta[r] = sum;
}
template <typename T>
__global__ void flash_delta_half_kernel(const T* dout, const T* out, float* delta, int64_t rows, int d) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  float sum = 0;
  for (int c = lane; c < d; c += 32) sum += Half2<T>::to_float(dout[r * d + c]) * Half2<T>::to_float(out[r * d + c]);
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) delta[r] = sum;
}

// dst[i] = T(src[i]·scale)
template <typename T>
__global__ void flash_convert_kernel(T* dst, const float* src, int64_t count, float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = Half2<T>::from_float(src[i] * scale);
}

template <typename T, int D>
__global__ void __launch_bounds__(TcShape<D>::kThreads) flash_bwd_tc_kernel(const FlashParams p, int query_tiles_per_block) {
  using S = TcShape<D>;
  constexpr int kDp = S::kDp, kLd = S::kLd, kRows = S::kRows, kCols = S::kCols, kWarps = S::kWarps;
  constexpr int kLdS = kCols + 8;  // dS tile [kRows][kLdS]
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kCols * kLd;
  T* sQ0 = sV + kCols * kLd;        // Q and dO, two buffers each: [buf][kRows][kLd]
  T* sdO0 = sQ0 + 2 * kRows * kLd;
  T* sdS = sdO0 + 2 * kRows * kLd;
  float* sL0 = reinterpret_cast<float*>(sdS + kRows * kLdS);  // [buf][kRows]: raw lse (natural log)
  float* sD0 = sL0 + 2 * kRows;                               // [buf][kRows]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t n = blockIdx.y, j0 = int64_t(blockIdx.x) * kCols;
  const T* q = static_cast<const T*>(p.q) + n * p.q_len * D;
  const T* k = static_cast<const T*>(p.k) + n * p.k_len * D;
  const T* v = static_cast<const T*>(p.v) + n * p.k_len * D;
  const T* dout = static_cast<const T*>(p.grad_out) + n * p.q_len * D;
  const float* lse = static_cast<const float*>(p.lse) + n * p.q_len;
  const float* delta = static_cast<const float*>(p.delta) + n * p.q_len;
  const T* mask = static_cast<const T*>(p.mask);
  const float sl2 = float(p.scale) * kLog2e;

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;
  const int kr0 = warp * 16;                                  // this warp's key rows in the tile
  const int64_t key[2] = {j0 + kr0 + g, j0 + kr0 + g + 8};

  // query tiles of this block: [first, last)
  const int64_t all_tiles = (p.q_len + kRows - 1) / kRows;
  int64_t first = int64_t(blockIdx.z) * query_tiles_per_block;
  const int64_t last = min(all_tiles, first + query_tiles_per_block);
  if (p.causal) first = max(first, j0 / kRows);  // earlier query tiles see none of these keys

  // Q, dO, lse, delta of query tile `it` into buffer `buf` (zero past q_len: such rows then
  // have dO = 0 and D = 0, so whatever P they get adds nothing to dV, dK, and dQ skips them).
  auto load_query_tile = [&](int64_t it, int buf) {
    const int64_t i0 = it * kRows;
    load_tile_async<T, kDp>(sQ0 + buf * kRows * kLd, kLd, q, i0, kRows, p.q_len, D, tid, S::kThreads);
    load_tile_async<T, kDp>(sdO0 + buf * kRows * kLd, kLd, dout, i0, kRows, p.q_len, D, tid, S::kThreads);
    for (int r = tid; r < 2 * kRows; r += S::kThreads) {
      const int rr = r % kRows;
      const bool in = i0 + rr < p.q_len;
      if (r < kRows) cp_async4(sL0 + buf * kRows + rr, in ? lse + i0 + rr : lse, in);
      else cp_async4(sD0 + buf * kRows + rr, in ? delta + i0 + rr : delta, in);
    }
  };

  load_tile_async<T, kDp>(sK, kLd, k, j0, kCols, p.k_len, D, tid, S::kThreads);
  load_tile_async<T, kDp>(sV, kLd, v, j0, kCols, p.k_len, D, tid, S::kThreads);
  if (first < last) load_query_tile(first, 0);
  cp_async_commit();

  for (int64_t it = first; it < last; ++it) {
    const int64_t i0 = it * kRows;
    const int buf = int((it - first) & 1);
    const T* sQ = sQ0 + buf * kRows * kLd;
    const T* sdO = sdO0 + buf * kRows * kLd;
    const float* sL = sL0 + buf * kRows;
    const float* sD = sD0 + buf * kRows;
    cp_async_wait_all();
    __syncthreads();  // tile it landed; every warp is done with tile it − 1 (dS, the other buffer)
    if (it + 1 < last) load_query_tile(it + 1, buf ^ 1);
    cp_async_commit();

    // Sᵀ = K·Qᵀ: 16 keys × 64 queries per warp
    float st[kRows / 8][4];
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kDp / 16; ++kk) {
      uint32_t a[4];
      ldsm_a(a, sK, kr0, kk * 16, kLd, lane);
#pragma unroll
      for (int j = 0; j < kRows / 8; j += 2) {
        uint32_t b[4];
        ldsm_b_pair(b, sQ, j * 8, kk * 16, kLd, lane);
        mma16816(st[j], a, b, T());
        mma16816(st[j + 1], a, b + 2, T());
      }
    }
    // Pᵀ = exp2(s2 − L2); bounds, causal and mask only on the last / diagonal tiles or with a mask
    const bool plain = !mask && j0 + kCols <= p.k_len && (!p.causal || i0 >= j0 + kCols - 1);
    if (plain) {
#pragma unroll
      for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ql = j * 8 + 2 * t + (e & 1);
          st[j][e] = fast_exp2(fmaf(st[j][e], sl2, -sL[ql] * kLog2e));
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ql = j * 8 + 2 * t + (e & 1);
          const int64_t qi = i0 + ql, kj = key[e / 2];
          float x = st[j][e] * sl2;
          if (kj >= p.k_len || (p.causal && kj > qi)) x = -INFINITY;
          else if (mask && qi < p.q_len) x += mask_log2(p, mask, n, qi, kj);
          st[j][e] = fast_exp2(x - sL[ql] * kLog2e);
        }
      }
    }
    // dV += Pᵀ·dO
#pragma unroll
    for (int kk = 0; kk < kRows / 16; ++kk) {
      uint32_t a[4];
      a[0] = Half2<T>::pack(st[2 * kk][0], st[2 * kk][1]);
      a[1] = Half2<T>::pack(st[2 * kk][2], st[2 * kk][3]);
      a[2] = Half2<T>::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      a[3] = Half2<T>::pack(st[2 * kk + 1][2], st[2 * kk + 1][3]);
#pragma unroll
      for (int j = 0; j + 1 < D / 8; j += 2) {
        uint32_t b[4];
        ldsm_b_trans_pair(b, sdO, kk * 16, j * 8, kLd, lane);
        mma16816(dv[j], a, b, T());
        mma16816(dv[j + 1], a, b + 2, T());
      }
      if constexpr (D / 8 % 2 == 1) {
        uint32_t b[2];
        ldmatrix_b_trans(b, sdO, kk * 16, (D / 8 - 1) * 8, kLd, lane);
        mma16816(dv[D / 8 - 1], a, b, T());
      }
    }
    // dPᵀ = V·dOᵀ, then dSᵀ = Pᵀ∘(dPᵀ − D)
    float dpt[kRows / 8][4];
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kDp / 16; ++kk) {
      uint32_t a[4];
      ldsm_a(a, sV, kr0, kk * 16, kLd, lane);
#pragma unroll
      for (int j = 0; j < kRows / 8; j += 2) {
        uint32_t b[4];
        ldsm_b_pair(b, sdO, j * 8, kk * 16, kLd, lane);
        mma16816(dpt[j], a, b, T());
        mma16816(dpt[j + 1], a, b + 2, T());
      }
    }
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = j * 8 + 2 * t + (e & 1);
        const float ds = st[j][e] * (dpt[j][e] - sD[ql]);
        st[j][e] = ds;
        sdS[ql * kLdS + kr0 + g + (e / 2) * 8] = Half2<T>::from_float(ds);
      }
    }
    // dK += dSᵀ·Q (scale applied at the end)
#pragma unroll
    for (int kk = 0; kk < kRows / 16; ++kk) {
      uint32_t a[4];
      a[0] = Half2<T>::pack(st[2 * kk][0], st[2 * kk][1]);
      a[1] = Half2<T>::pack(st[2 * kk][2], st[2 * kk][3]);
      a[2] = Half2<T>::pack(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      a[3] = Half2<T>::pack(st[2 * kk + 1][2], st[2 * kk + 1][3]);
#pragma unroll
      for (int j = 0; j + 1 < D / 8; j += 2) {
        uint32_t b[4];
        ldsm_b_trans_pair(b, sQ, kk * 16, j * 8, kLd, lane);
        mma16816(dk[j], a, b, T());
        mma16816(dk[j + 1], a, b + 2, T());
      }
      if constexpr (D / 8 % 2 == 1) {
        uint32_t b[2];
        ldmatrix_b_trans(b, sQ, kk * 16, (D / 8 - 1) * 8, kLd, lane);
        mma16816(dk[D / 8 - 1], a, b, T());
      }
    }
    __syncthreads();  // dS complete in shared memory
    // dQ += dS·K: each warp a 16-query slice, added into the f32 buffer
    if (p.dq_accum) {
      for (int slice = warp; slice < kRows / 16; slice += kWarps) {
        float acc[D / 8][4];
#pragma unroll
        for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kCols / 16; ++kk) {
          uint32_t a[4];
          ldsm_a(a, sdS, slice * 16, kk * 16, kLdS, lane);
#pragma unroll
          for (int j = 0; j + 1 < D / 8; j += 2) {
            uint32_t b[4];
            ldsm_b_trans_pair(b, sK, kk * 16, j * 8, kLd, lane);
            mma16816(acc[j], a, b, T());
            mma16816(acc[j + 1], a, b + 2, T());
          }
          if constexpr (D / 8 % 2 == 1) {
            uint32_t b[2];
            ldmatrix_b_trans(b, sK, kk * 16, (D / 8 - 1) * 8, kLd, lane);
            mma16816(acc[D / 8 - 1], a, b, T());
          }
        }
        float* dq = p.dq_accum + (n * p.q_len + i0 + slice * 16) * D;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = g + h * 8;
          if (i0 + slice * 16 + r >= p.q_len) continue;
#pragma unroll
          for (int j = 0; j < D / 8; ++j) atomic_add2(dq + r * D + j * 8 + 2 * t, acc[j][2 * h], acc[j][2 * h + 1]);
        }
      }
    }
  }
  cp_async_wait_all();  // a block with no query tile (causal) still has K/V copies in flight
  // dK, dV of this block's keys into the f32 buffers
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t kj = key[h];
    if (kj >= p.k_len) continue;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int64_t off = (n * p.k_len + kj) * D + j * 8 + 2 * t;
      if (p.dk_accum) atomic_add2(p.dk_accum + off, dk[j][2 * h], dk[j][2 * h + 1]);
      if (p.dv_accum) atomic_add2(p.dv_accum + off, dv[j][2 * h], dv[j][2 * h + 1]);
    }
  }
}

template <int D>
size_t tc_fwd_smem() {
  using S = TcShape<D>;
  return size_t(TcFwdShape<D>::kRows + 4 * S::kCols) * S::kLd * 2;  // Q, K and V double-buffered
}
template <int D>
size_t tc_bwd_smem() {
  using S = TcShape<D>;
  // K, V; Q and dO double-buffered; dS; lse and delta double-buffered
  return size_t(2 * S::kCols + 4 * S::kRows) * S::kLd * 2 + size_t(S::kRows) * (S::kCols + 8) * 2 +
         4 * S::kRows * sizeof(float);
}

int sm_count() {
  static int count = [] {
    int dev = 0, c = 0;
    LOOM_CUDA_CHECK(cudaGetDevice(&dev));
    LOOM_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev));
    return c;
  }();
  return count;
}

template <typename T, int D>
void tc_forward(const FlashParams& p) {
  using S = TcShape<D>;
  const size_t smem = tc_fwd_smem<D>();
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  constexpr int kRows = TcFwdShape<D>::kRows;
  const dim3 grid(unsigned((p.q_len + kRows - 1) / kRows), unsigned(p.n));
  flash_fwd_tc_kernel<T, D><<<grid, S::kThreads, smem>>>(p);
  check_last_launch("flash_fwd_tc_kernel");
}

template <typename T, int D>
void tc_backward(const FlashParams& p) {
  using S = TcShape<D>;
  const int64_t rows = p.n * p.q_len;
  flash_delta_half_kernel<T><<<unsigned((rows + 7) / 8), 256>>>(static_cast<const T*>(p.grad_out),
                                                                  static_cast<const T*>(p.out),
                                                                  static_cast<float*>(p.delta), rows, D);
  check_last_launch("flash_delta_half_kernel");
  if (p.dq_accum) LOOM_CUDA_CHECK(cudaMemsetAsync(p.dq_accum, 0, size_t(rows) * D * sizeof(float)));
  const size_t kv = size_t(p.n * p.k_len) * D * sizeof(float);
  LOOM_CUDA_CHECK(cudaMemsetAsync(p.dk_accum, 0, kv));
  LOOM_CUDA_CHECK(cudaMemsetAsync(p.dv_accum, 0, kv));

  const size_t smem = tc_bwd_smem<D>();
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int64_t key_blocks = (p.k_len + S::kCols - 1) / S::kCols;
  const int64_t query_tiles = (p.q_len + S::kRows - 1) / S::kRows;
  // Split the query tiles over blocks until the grid fills the GPU about twice.
  const int64_t want = 2 * int64_t(sm_count());
  int64_t splits = 1;
  while (key_blocks * p.n * splits < want && splits < query_tiles) splits *= 2;
  splits = std::min(splits, query_tiles);
  const int64_t per_block = (query_tiles + splits - 1) / splits;
  splits = (query_tiles + per_block - 1) / per_block;
  const dim3 grid(unsigned(key_blocks), unsigned(p.n), unsigned(splits));
  flash_bwd_tc_kernel<T, D><<<grid, S::kThreads, smem>>>(p, int(per_block));
  check_last_launch("flash_bwd_tc_kernel");

  const float scale = float(p.scale);
  auto convert = [&](void* dst, const float* src, int64_t count, float s) {
    if (!dst) return;
    flash_convert_kernel<T><<<grid_for(count), kThreads>>>(static_cast<T*>(dst), src, count, s);
    check_last_launch("flash_convert_kernel");
  };
  convert(p.dq, p.dq_accum, rows * D, scale);
  convert(p.dk, p.dk_accum, p.n * p.k_len * D, scale);
  convert(p.dv_out, p.dv_accum, p.n * p.k_len * D, 1.f);
}

template <typename T>
void tc_dispatch(const FlashParams& p, bool backward) {
  switch (p.d) {
#define LOOM_FLASH_CASE(D)                       \
  case D:                                        \
    return backward ? tc_backward<T, D>(p) : tc_forward<T, D>(p);
    LOOM_FLASH_CASE(40)
    LOOM_FLASH_CASE(64)
    LOOM_FLASH_CASE(72)
    LOOM_FLASH_CASE(80)
    LOOM_FLASH_CASE(96)
    LOOM_FLASH_CASE(128)
    LOOM_FLASH_CASE(160)
#undef LOOM_FLASH_CASE
  }
  LOOM_FAIL("attention backend 'flash' does not support head dim ", p.d, " on cuda");
}

// =================================== exact family ===================================

constexpr int kExactThreads = 64;  // rows per block (one per thread)
constexpr int kExactTile = 32;     // rows of the other side staged per step

template <typename T>
__device__ __forceinline__ T exact_mask(const FlashParams& p, const T* mask, int64_t n, int64_t qi, int64_t kj) {
  const int64_t b = p.mask_batches == 1 ? 0 : n / p.heads;
  const int64_t r = p.mask_rows == 1 ? 0 : qi;
  return mask[(b * p.mask_rows + r) * p.k_len + kj];
}

// The score of (qi, kj) with scale, mask and causal applied (−inf when masked out).
template <typename T>
__device__ __forceinline__ T exact_score(const FlashParams& p, const T* mask, int64_t n, int64_t qi, int64_t kj, T dot) {
  if (p.causal && kj > qi) return -INFINITY;
  T s = dot * T(p.scale);
  if (mask) s += exact_mask(p, mask, n, qi, kj);
  return s;
}

// Copies rows [r0, r0 + rows) of a [len, d] matrix into tile [rows][d] (zero past len).
template <typename T>
__device__ void exact_stage(T* tile, const T* src, int64_t r0, int rows, int64_t len, int d) {
  for (int idx = threadIdx.x; idx < rows * d; idx += blockDim.x) {
    const int r = idx / d, c = idx % d;
    tile[idx] = r0 + r < len ? src[(r0 + r) * d + c] : T(0);
  }
}

template <typename T, int MAXD>
__global__ void __launch_bounds__(kExactThreads) flash_fwd_exact_kernel(const FlashParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = int(p.d), dv = int(p.dv);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kExactTile * d;
  const int64_t n = blockIdx.y, qi = int64_t(blockIdx.x) * kExactThreads + threadIdx.x;
  const bool active = qi < p.q_len;
  const T* q = static_cast<const T*>(p.q) + (n * p.q_len + (active ? qi : 0)) * d;
  const T* k = static_cast<const T*>(p.k) + n * p.k_len * d;
  const T* v = static_cast<const T*>(p.v) + n * p.k_len * dv;
  const T* mask = static_cast<const T*>(p.mask);
  T qr[MAXD], o[MAXD];
#pragma unroll
  for (int c = 0; c < MAXD; ++c) qr[c] = c < d ? q[c] : T(0), o[c] = T(0);
  T m = -INFINITY, l = 0;
  const int64_t last_q = min(p.q_len - 1, int64_t(blockIdx.x) * kExactThreads + kExactThreads - 1);
  for (int64_t j0 = 0; j0 < p.k_len; j0 += kExactTile) {
    if (p.causal && j0 > last_q) break;
    __syncthreads();
    exact_stage(sK, k, j0, kExactTile, p.k_len, d);
    exact_stage(sV, v, j0, kExactTile, p.k_len, dv);
    __syncthreads();
    if (!active) continue;
    const int cnt = int(min(int64_t(kExactTile), p.k_len - j0));
    for (int jj = 0; jj < cnt; ++jj) {
      T dot = 0;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) dot += qr[c] * sK[jj * d + c];
      const T s = exact_score(p, mask, n, qi, j0 + jj, dot);
      const T m_new = s > m ? s : m;
      const T shift = m_new == T(-INFINITY) ? T(0) : m_new;
      const T corr = exp(m - shift), e = exp(s - shift);
      l = l * corr + e;
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < dv) o[c] = o[c] * corr + e * sV[jj * dv + c];
      m = m_new;
    }
  }
  if (!active) return;
  T* out = static_cast<T*>(p.out) + (n * p.q_len + qi) * dv;
#pragma unroll
  for (int c = 0; c < MAXD; ++c)
    if (c < dv) out[c] = o[c] / l;
  static_cast<T*>(p.lse)[n * p.q_len + qi] = m + log(l);
}

// dK, dV: one thread per key; the query side staged (Q, dO, L, D).
template <typename T, int MAXD>
__global__ void __launch_bounds__(kExactThreads) flash_bwd_kv_exact_kernel(const FlashParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = int(p.d), dv = int(p.dv);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kExactTile * d;
  T* sL = sdO + kExactTile * dv;
  T* sD = sL + kExactTile;
  const int64_t n = blockIdx.y, kj = int64_t(blockIdx.x) * kExactThreads + threadIdx.x;
  const bool active = kj < p.k_len;
  const T* kp = static_cast<const T*>(p.k) + (n * p.k_len + (active ? kj : 0)) * d;
  const T* vp = static_cast<const T*>(p.v) + (n * p.k_len + (active ? kj : 0)) * dv;
  const T* q = static_cast<const T*>(p.q) + n * p.q_len * d;
  const T* dout = static_cast<const T*>(p.grad_out) + n * p.q_len * dv;
  const T* lse = static_cast<const T*>(p.lse) + n * p.q_len;
  const T* delta = static_cast<const T*>(p.delta) + n * p.q_len;
  const T* mask = static_cast<const T*>(p.mask);
  T kr[MAXD], vr[MAXD], dk[MAXD], dvv[MAXD];
#pragma unroll
  for (int c = 0; c < MAXD; ++c) {
    kr[c] = c < d ? kp[c] : T(0), vr[c] = c < dv ? vp[c] : T(0);
    dk[c] = dvv[c] = T(0);
  }
  const int64_t first_key = int64_t(blockIdx.x) * kExactThreads;
  const int64_t start = p.causal ? first_key / kExactTile * kExactTile : 0;
  for (int64_t i0 = start; i0 < p.q_len; i0 += kExactTile) {
    __syncthreads();
    exact_stage(sQ, q, i0, kExactTile, p.q_len, d);
    exact_stage(sdO, dout, i0, kExactTile, p.q_len, dv);
    for (int r = threadIdx.x; r < kExactTile; r += blockDim.x) {
      sL[r] = i0 + r < p.q_len ? lse[i0 + r] : T(0);
      sD[r] = i0 + r < p.q_len ? delta[i0 + r] : T(0);
    }
    __syncthreads();
    if (!active) continue;
    const int cnt = int(min(int64_t(kExactTile), p.q_len - i0));
    for (int ii = 0; ii < cnt; ++ii) {
      T dot = 0, dp = 0;
#pragma unroll
      for (int c = 0; c < MAXD; ++c) {
        if (c < d) dot += kr[c] * sQ[ii * d + c];
        if (c < dv) dp += vr[c] * sdO[ii * dv + c];
      }
      const T pr = exp(exact_score(p, mask, n, i0 + ii, kj, dot) - sL[ii]);
      const T ds = pr * (dp - sD[ii]);
#pragma unroll
      for (int c = 0; c < MAXD; ++c) {
        if (c < dv) dvv[c] += pr * sdO[ii * dv + c];
        if (c < d) dk[c] += ds * sQ[ii * d + c];
      }
    }
  }
  if (!active) return;
  if (p.dk) {
    T* o = static_cast<T*>(p.dk) + (n * p.k_len + kj) * d;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) o[c] = dk[c] * T(p.scale);
  }
  if (p.dv_out) {
    T* o = static_cast<T*>(p.dv_out) + (n * p.k_len + kj) * dv;
#pragma unroll
    for (int c = 0; c < MAXD; ++c)
      if (c < dv) o[c] = dvv[c];
  }
}

// dQ: one thread per query; the key side staged (K, V).
template <typename T, int MAXD>
__global__ void __launch_bounds__(kExactThreads) flash_bwd_q_exact_kernel(const FlashParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = int(p.d), dv = int(p.dv);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kExactTile * d;
  const int64_t n = blockIdx.y, qi = int64_t(blockIdx.x) * kExactThreads + threadIdx.x;
  const bool active = qi < p.q_len;
  const int64_t row = n * p.q_len + (active ? qi : 0);
  const T* qp = static_cast<const T*>(p.q) + row * d;
  const T* dop = static_cast<const T*>(p.grad_out) + row * dv;
  const T* k = static_cast<const T*>(p.k) + n * p.k_len * d;
  const T* v = static_cast<const T*>(p.v) + n * p.k_len * dv;
  const T* mask = static_cast<const T*>(p.mask);
  const T L = static_cast<const T*>(p.lse)[row], Dl = static_cast<const T*>(p.delta)[row];
  T qr[MAXD], dor[MAXD], dq[MAXD];
#pragma unroll
  for (int c = 0; c < MAXD; ++c) {
    qr[c] = c < d ? qp[c] : T(0), dor[c] = c < dv ? dop[c] : T(0);
    dq[c] = T(0);
  }
  const int64_t last_q = min(p.q_len - 1, int64_t(blockIdx.x) * kExactThreads + kExactThreads - 1);
  for (int64_t j0 = 0; j0 < p.k_len; j0 += kExactTile) {
    if (p.causal && j0 > last_q) break;
    __syncthreads();
    exact_stage(sK, k, j0, kExactTile, p.k_len, d);
    exact_stage(sV, v, j0, kExactTile, p.k_len, dv);
    __syncthreads();
    if (!active) continue;
    const int cnt = int(min(int64_t(kExactTile), p.k_len - j0));
    for (int jj = 0; jj < cnt; ++jj) {
      T dot = 0, dp = 0;
#pragma unroll
      for (int c = 0; c < MAXD; ++c) {
        if (c < d) dot += qr[c] * sK[jj * d + c];
        if (c < dv) dp += dor[c] * sV[jj * dv + c];
      }
      const T ds = exp(exact_score(p, mask, n, qi, j0 + jj, dot) - L) * (dp - Dl);
#pragma unroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) dq[c] += ds * sK[jj * d + c];
    }
  }
  if (!active) return;
  T* o = static_cast<T*>(p.dq) + row * d;
#pragma unroll
  for (int c = 0; c < MAXD; ++c)
    if (c < d) o[c] = dq[c] * T(p.scale);
}

template <typename T, int MAXD>
void exact_run(const FlashParams& p, bool backward) {
  const size_t stage = size_t(kExactTile) * size_t(p.d + p.dv) * sizeof(T);
  const dim3 qgrid(unsigned((p.q_len + kExactThreads - 1) / kExactThreads), unsigned(p.n));
  const int kv_smem = int(stage + 2 * kExactTile * sizeof(T));
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_exact_kernel<T, MAXD>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(stage)));
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_q_exact_kernel<T, MAXD>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(stage)));
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_kv_exact_kernel<T, MAXD>, cudaFuncAttributeMaxDynamicSharedMemorySize, kv_smem));
  if (!backward) {
    flash_fwd_exact_kernel<T, MAXD><<<qgrid, kExactThreads, stage>>>(p);
    check_last_launch("flash_fwd_exact_kernel");
    return;
  }
  const int64_t rows = p.n * p.q_len;
  flash_delta_kernel<T, T><<<unsigned((rows + 7) / 8), 256>>>(static_cast<const T*>(p.grad_out),
                                                              static_cast<const T*>(p.out), static_cast<T*>(p.delta),
                                                              rows, int(p.dv));
  check_last_launch("flash_delta_kernel");
  if (p.dk || p.dv_out) {
    const dim3 kgrid(unsigned((p.k_len + kExactThreads - 1) / kExactThreads), unsigned(p.n));
    flash_bwd_kv_exact_kernel<T, MAXD><<<kgrid, kExactThreads, size_t(kv_smem)>>>(p);
    check_last_launch("flash_bwd_kv_exact_kernel");
  }
  if (p.dq) {
    flash_bwd_q_exact_kernel<T, MAXD><<<qgrid, kExactThreads, stage>>>(p);
    check_last_launch("flash_bwd_q_exact_kernel");
  }
}

template <typename T>
void exact_dispatch(const FlashParams& p, bool backward) {
  const int64_t d = std::max(p.d, p.dv);
  if (d <= 64) return exact_run<T, 64>(p, backward);
  if (d <= 160) return exact_run<T, 160>(p, backward);
  return exact_run<T, 256>(p, backward);
}

void dispatch(const FlashParams& p, bool backward) {
  switch (p.dtype) {
    case DType::BF16: return tc_dispatch<__nv_bfloat16>(p, backward);
    case DType::F16: return tc_dispatch<__half>(p, backward);
    case DType::F32: return exact_dispatch<float>(p, backward);
    case DType::F64: return exact_dispatch<double>(p, backward);
    default: break;
  }
  LOOM_FAIL("attention backend 'flash' does not support dtype ", p.dtype, " on cuda");
}

}  // namespace

bool flash_tensor_core_head_dim(int64_t d) {
  return d == 40 || d == 64 || d == 72 || d == 80 || d == 96 || d == 128 || d == 160;
}

void launch_flash_forward(const FlashParams& p) {
  if (p.n == 0 || p.q_len == 0) return;
  dispatch(p, false);
}

void launch_flash_backward(const FlashParams& p) {
  if (p.n == 0) return;
  dispatch(p, true);
}

}  // namespace loom::cuda
