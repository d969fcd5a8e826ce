// Flash attention, tensor-core forward (bf16 / f16). The comment below covers the whole family
//
// Tensor-core family (bf16 / f16), per warp one or two 16-row slices, mma.sync m16n8k16 with f32
// accumulators. Scores live in the log2 domain: s2 = (q·k·scale + mask)·log2(e), so that
// P = exp2(s2 − m2) and the stored log-sum-exp (natural log) is (m2 + log2 l)·ln 2.
//   forward   block = (128 queries for d ≤ 80 — two 16-row slices per warp —, else 64; row n);
//             loops over key tiles of 64, cp.async double-buffered (tile it + 1 is copied
//             while tile it is used); the head dim is padded with zeros to a multiple of 16 in
//             shared memory only (QKᵀ's k-dim); P·V runs over the exact head dim in steps of 8.
//   backward  block = (64 or 128 keys, row n, a share of the query tiles; the warp layouts of
//             cuda_flash_bwd.cu); per 64-query tile (Q, dO, lse, delta cp.async double-buffered):
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
#include "tensor/cuda/cuda_flash_tc.cuh"

namespace loom::cuda {

namespace {

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
  const FlashRows qr = flash_rows(p, n, p.q_len, D), kr = flash_rows(p, n, p.k_len, D);
  const T* q = static_cast<const T*>(p.q) + qr.base;
  const T* k = static_cast<const T*>(p.k) + kr.base;
  const T* v = static_cast<const T*>(p.v) + kr.base;
  const T* mask = static_cast<const T*>(p.mask);
  const float sl2 = float(p.scale) * kLog2e;

  // key tiles [0, tiles): with causal, those whose first key is ≤ the tile's last query
  int64_t tiles = (p.k_len + kCols - 1) / kCols;
  if (p.causal) tiles = min(tiles, (i0 + kRows - 1) / kCols + 1);

  // Q and the first K/V tile in one cp.async group; tile it + 1 is copied while tile it is used.
  load_tile_async<T, kDp>(sQ, kLd, q, i0, kRows, p.q_len, D, qr.stride, tid, S::kThreads);
  if (tiles > 0) {
    load_tile_async<T, kDp>(sK0, kLd, k, 0, kCols, p.k_len, D, kr.stride, tid, S::kThreads);
    load_tile_async<T, kDp>(sV0, kLd, v, 0, kCols, p.k_len, D, kr.stride, tid, S::kThreads);
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
      load_tile_async<T, kDp>(sK0 + (buf ^ 1) * kCols * kLd, kLd, k, j0 + kCols, kCols, p.k_len, D, kr.stride, tid, S::kThreads);
      load_tile_async<T, kDp>(sV0 + (buf ^ 1) * kCols * kLd, kLd, v, j0 + kCols, kCols, p.k_len, D, kr.stride, tid, S::kThreads);
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
    // on the last / diagonal tiles and with a mask: scale, bounds, causal and mask; other tiles
    // keep s raw and scale it inside the exponent's FFMA (fs)
    const bool plain = !mask && j0 + kCols <= p.k_len && (!p.causal || j0 + kCols - 1 <= i0);
    const float fs = plain ? sl2 : 1.f;
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) {
      if (!plain) {
        // the last column of this tile that row h of slice a may see (tile-relative, 32-bit):
        // the keys in range, and with causal those ≤ the row's query
        int last[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          int64_t lim = p.k_len - j0 < kCols ? p.k_len - j0 - 1 : kCols - 1;
          if (p.causal && row_q[a][h] - j0 < lim) lim = row_q[a][h] - j0;
          last[h] = lim < 0 ? -1 : int(lim);
        }
#pragma unroll
        for (int j = 0; j < kCols / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = j * 8 + 2 * t + (e & 1);
            float x = s[a][j][e] * sl2;
            if (col > last[e / 2]) x = -INFINITY;
            else if (mask && row_q[a][e / 2] < p.q_len) x += mask_log2(p, mask, n, row_q[a][e / 2], j0 + col);
            s[a][j][e] = x;
          }
        }
      }
      // the online softmax of rows g (h = 0) and g + 8 (h = 1); m moves only when the tile's
      // maximum exceeds it by more than kMaxLag (cuda_flash_tc.cuh), so most tiles skip O's rescale
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kCols / 8; ++j) mx = fmaxf(mx, fmaxf(s[a][j][2 * h], s[a][j][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mx *= fs;  // fs > 0
        const float m_new = mx > m[a][h] + kMaxLag ? mx : m[a][h];  // m = −inf takes any finite mx
        const float shift = m_new == -INFINITY ? 0.f : m_new;       // a row masked so far keeps P = 0
        const float corr = m_new == m[a][h] ? 1.f : fast_exp2(m[a][h] - shift);
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kCols / 8; ++j) {
          s[a][j][2 * h] = fast_exp2(fmaf(s[a][j][2 * h], fs, -shift));
          s[a][j][2 * h + 1] = fast_exp2(fmaf(s[a][j][2 * h + 1], fs, -shift));
          sum += s[a][j][2 * h] + s[a][j][2 * h + 1];
        }
        l[a][h] = l[a][h] * corr + sum;  // this thread's share of the row; summed over the 4 lanes at the end
        m[a][h] = m_new;
        if (__any_sync(0xffffffffu, corr != 1.f)) {
#pragma unroll
          for (int j = 0; j < D / 8; ++j) o[a][j][2 * h] *= corr, o[a][j][2 * h + 1] *= corr;
        }
      }
    }
    // O += P·V, P straight from the accumulators
    accumulate_pv<T, D, kAtoms, kCols>(o, s, sV, kLd, lane);
  }

  T* out = static_cast<T*>(p.out) + qr.base;
  float* lse = static_cast<float*>(p.lse) + n * p.q_len;
#pragma unroll
  for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[a][h] += __shfl_xor_sync(0xffffffffu, l[a][h], 1);
      l[a][h] += __shfl_xor_sync(0xffffffffu, l[a][h], 2);
      const int64_t qi = row_q[a][h];
      if (qi >= p.q_len) continue;
      store_output_row<T, D>(out + qi * qr.stride, lse + qi, o[a], h, m[a][h], l[a][h], t);
    }
  }
}

template <int D>
size_t tc_fwd_smem() {
  using S = TcShape<D>;
  return size_t(TcFwdShape<D>::kRows + 4 * S::kCols) * S::kLd * 2;  // Q, K and V double-buffered
}
template <typename T, int D>
void tc_forward(const FlashParams& p) {
  using S = TcShape<D>;
  const size_t smem = tc_fwd_smem<D>();
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  constexpr int kRows = TcFwdShape<D>::kRows;
  const dim3 grid(unsigned((p.q_len + kRows - 1) / kRows), unsigned(p.n));
  flash_fwd_tc_kernel<T, D><<<grid, S::kThreads, smem, compute_stream()>>>(p);
  check_last_launch("flash_fwd_tc_kernel");
}

template <typename T>
void flash_tc_forward_for(const FlashParams& p) {
  dispatch_head_dim(p.d, "", [&](auto dim) { tc_forward<T, decltype(dim)::value>(p); });
}

}  // namespace

// Whether the forward of p runs on wgmma (cuda_flash.h). By default: head dims 40, 64 on a device
// that has it, with at least 128 keys (H200, docs/gpu-bench.md run 10: 0.227 against 0.266 ms at
// (2,8,4096,40), 0.243 against 0.298 at (2,8,4096,64); at 77 keys its 128-key tile is mostly
// padding, 0.034 against 0.030 ms). LOOM_FLASH_FWD=mma / wgmma force either.
bool forward_on_wgmma(const FlashParams& p) { return flash_wgmma_chosen(p, "LOOM_FLASH_FWD", p.k_len >= 128); }

void flash_tc_forward(const FlashParams& p) {
  if (forward_on_wgmma(p)) return flash_wgmma_forward(p);
  if (flash_short_forward_chosen(p)) return flash_short_forward(p);
  if (p.dtype == DType::BF16) return flash_tc_forward_for<__nv_bfloat16>(p);
  if (p.dtype == DType::F16) return flash_tc_forward_for<__half>(p);
  LOOM_FAIL("flash_tc_forward: dtype ", p.dtype, " is not bf16 / f16");
}

}  // namespace loom::cuda
