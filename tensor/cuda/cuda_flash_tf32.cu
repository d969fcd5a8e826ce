// Flash attention on TF32 tensor cores for f32 inputs (--precision tf32, allow_tf32()): the
// forward here, the backward in cuda_flash_tf32_bwd.cu, device helpers in cuda_flash_tf32.cuh.
// Contract (cuda_flash.h): the same as the bf16 / f16 tensor-core family — head dims 40, 64, 72,
// 80, 96, 128, 160 (d == dv), any Q and K, masks [Bm, Qm, K] (f32, additive), causal, both
// layouts of FlashParams; the forward saves O (f32) and the f32 log-sum-exp (natural log) per
// query row. Operands are rounded to TF32 (cvt.rna) as they enter an mma: Q, K, V, and P.
//
// Forward: block = (64 queries, row n), 4 warps of 16 query rows; loops over key tiles of 64,
// cp.async double-buffered (tile it + 1 is copied while tile it is used). Scores in the log2
// domain: s2 = (q·k·scale + mask)·log2(e), P = exp2(s2 − m2), lse = (m2 + log2 l)·ln 2.
// S = Q·Kᵀ reads Q and K as kStd fragments; O += P·V takes P from the accumulators (kPair) and
// V as a [key][d] tile. Interior tiles (no mask, every key in range, wholly below the causal
// diagonal) skip the per-element bounds / causal / mask code, as the bf16 kernels do.
#include "tensor/cuda/cuda_flash_tf32.cuh"

namespace loom::cuda {

namespace {

// Q's fragments stay in registers for the whole key loop up to this head dim (above, ptxas
// would spill: they are re-read from shared memory per key tile).
constexpr int kTf32QInRegsMaxD = 64;

template <int D>
__global__ void __launch_bounds__(Tf32Shape<D>::kThreads) flash_fwd_tf32_kernel(const FlashParams p) {
  using S = Tf32Shape<D>;
  constexpr int kLd = S::kLd, kRows = S::kRows, kCols = S::kCols, kT = S::kThreads;
  constexpr bool kQInRegs = D <= kTf32QInRegsMaxD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sQ = reinterpret_cast<float*>(smem_raw);  // [kRows][kLd]
  float* sK0 = sQ + kRows * kLd;                   // K and V, two buffers each: [buf][kCols][kLd]
  float* sV0 = sK0 + 2 * kCols * kLd;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t n = blockIdx.y, i0 = int64_t(blockIdx.x) * kRows;
  const FlashRows qr = flash_rows(p, n, p.q_len, D), kr = flash_rows(p, n, p.k_len, D);
  const float* q = static_cast<const float*>(p.q) + qr.base;
  const float* k = static_cast<const float*>(p.k) + kr.base;
  const float* v = static_cast<const float*>(p.v) + kr.base;
  const float* mask = static_cast<const float*>(p.mask);
  const float sl2 = float(p.scale) * kLog2e;
  const int r0 = warp * 16;  // this warp's query rows in the tile

  // key tiles [0, tiles): with causal, those whose first key is ≤ the tile's last query
  int64_t tiles = (p.k_len + kCols - 1) / kCols;
  if (p.causal) tiles = min(tiles, (i0 + kRows - 1) / kCols + 1);

  load_rows_f32<D>(sQ, kLd, q, i0, kRows, p.q_len, qr.stride, tid, kT);
  if (tiles > 0) {
    load_rows_f32<D>(sK0, kLd, k, 0, kCols, p.k_len, kr.stride, tid, kT);
    load_rows_f32<D>(sV0, kLd, v, 0, kCols, p.k_len, kr.stride, tid, kT);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[kQInRegs ? D / 8 : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 8; ++kk) frag_a(qf[kk], sQ, r0, kk * 8, kLd, g, t);
  }

  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int64_t row_q[2] = {i0 + r0 + g, i0 + r0 + g + 8};

  for (int64_t it = 0; it < tiles; ++it) {
    const int64_t j0 = it * kCols;
    const int buf = int(it & 1);
    const float* sK = sK0 + buf * kCols * kLd;
    const float* sV = sV0 + buf * kCols * kLd;
    cp_async_wait_all();
    __syncthreads();  // tile it landed for all threads; every warp is done with tile it − 1
    if (it + 1 < tiles) {
      load_rows_f32<D>(sK0 + (buf ^ 1) * kCols * kLd, kLd, k, j0 + kCols, kCols, p.k_len, kr.stride, tid, kT);
      load_rows_f32<D>(sV0 + (buf ^ 1) * kCols * kLd, kLd, v, j0 + kCols, kCols, p.k_len, kr.stride, tid, kT);
    }
    cp_async_commit();

    // S = Q·Kᵀ: 16 queries × 64 keys per warp
    float s[kCols / 8][4];
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 8; ++kk) {
      uint32_t qa[4];
      if constexpr (kQInRegs) {
#pragma unroll
        for (int r = 0; r < 4; ++r) qa[r] = qf[kk][r];
      } else {
        frag_a(qa, sQ, r0, kk * 8, kLd, g, t);
      }
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j) {
        uint32_t b[2];
        frag_b_nk(b, sK, j * 8, kk * 8, kLd, g, t);
        mma_tf32(s[j], qa, b);
      }
    }
    // scale; on the last / diagonal tiles and with a mask also bounds, causal and mask
    const bool plain = !mask && j0 + kCols <= p.k_len && (!p.causal || j0 + kCols - 1 <= i0);
    if (plain) {
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= sl2;
    } else {
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t kj = j0 + j * 8 + 2 * t + (e & 1), qi = row_q[e / 2];
          float x = s[j][e] * sl2;
          if (kj >= p.k_len || (p.causal && kj > qi)) x = -INFINITY;
          else if (mask && qi < p.q_len) x += mask_log2_f32(p, mask, n, qi, kj);
          s[j][e] = x;
        }
      }
    }
    // the online softmax of rows g (h = 0) and g + 8 (h = 1)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[h], mx);
      const float shift = m_new == -INFINITY ? 0.f : m_new;  // a row masked so far keeps P = 0
      const float corr = fast_exp2(m[h] - shift);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j) {
        s[j][2 * h] = fast_exp2(s[j][2 * h] - shift);
        s[j][2 * h + 1] = fast_exp2(s[j][2 * h + 1] - shift);
        sum += s[j][2 * h] + s[j][2 * h + 1];
      }
      l[h] = l[h] * corr + sum;  // this thread's share of the row; summed over the 4 lanes at the end
      m[h] = m_new;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) o[j][2 * h] *= corr, o[j][2 * h + 1] *= corr;
    }
    // O += P·V, P straight from the accumulators (kPair), V a [key][d] tile
#pragma unroll
    for (int kk = 0; kk < kCols / 8; ++kk) {
      uint32_t pa[4];
      frag_a_acc(pa, s[kk]);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        uint32_t b[2];
        frag_b_kn(b, sV, kk * 8, j * 8, kLd, g, t);
        mma_tf32(o[j], pa, b);
      }
    }
  }
  cp_async_wait_all();  // nothing in flight at exit (no key tile: only the Q copy)

  float* out = static_cast<float*>(p.out) + qr.base;
  float* lse = static_cast<float*>(p.lse) + n * p.q_len;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    const int64_t qi = row_q[h];
    if (qi >= p.q_len) continue;
    const float inv = 1.f / l[h];
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<float2*>(out + qi * qr.stride + j * 8 + 2 * t) =
          make_float2(o[j][2 * h] * inv, o[j][2 * h + 1] * inv);
    if (t == 0) lse[qi] = (m[h] + log2f(l[h])) * kLn2;
  }
}

template <int D>
constexpr size_t tf32_fwd_smem() {
  using S = Tf32Shape<D>;
  return size_t(S::kRows + 4 * S::kCols) * S::kLd * sizeof(float);  // Q; K and V double-buffered
}
static_assert(tf32_fwd_smem<160>() <= 227 * 1024, "the forward's shared memory exceeds 227 KB");

template <int D>
void tf32_forward(const FlashParams& p) {
  using S = Tf32Shape<D>;
  constexpr size_t smem = tf32_fwd_smem<D>();
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_tf32_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(unsigned((p.q_len + S::kRows - 1) / S::kRows), unsigned(p.n));
  flash_fwd_tf32_kernel<D><<<grid, S::kThreads, smem, compute_stream()>>>(p);
  check_last_launch("flash_fwd_tf32_kernel");
}

}  // namespace

void flash_tf32_forward(const FlashParams& p) {
  LOOM_CHECK(p.dtype == DType::F32, "flash_tf32_forward: dtype ", p.dtype, " is not f32");
  dispatch_head_dim(p.d, " in f32 with TF32", [&](auto dim) { tf32_forward<decltype(dim)::value>(p); });
}

}  // namespace loom::cuda
