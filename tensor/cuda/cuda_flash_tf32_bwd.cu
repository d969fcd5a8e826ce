// The TF32 flash backward (f32 inputs under --precision tf32); the forward and the family's
// contract are in cuda_flash_tf32.cu, the helpers in cuda_flash_tf32.cuh.
//
// 1. delta[r] = Σ_c tf32(dO[r, c])·O[r, c] (f32; dO rounded as the dP products round it, so that
//    dP − D is free of dO's rounding: with one key, dS is then 0 up to f32 sums, as it must be).
// 2. block = (64 keys, row n, a share of the query tiles), 4 warps of 16 keys; per query tile
//    (Q, dO, lse, delta cp.async double-buffered for d = 96, 128; single-buffered where that
//    lets more blocks share an SM, d = 40…80, or where two buffers do not fit, d = 160):
//      Sᵀ = K·Qᵀ, Pᵀ = exp2(s2 − L2), dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − D),
//      dK += dSᵀ·Q, dS to shared memory [query][key], dQ += scale·dS·K (each warp 16 queries,
//      in column chunks of ≤ 80, added into dq with atomics).
//    dQ, dK and dV are the f32 outputs themselves, zeroed first and added into with atomics (any
//    split of the query tiles adds into them), the scale applied as they are added (dS enters
//    the products unscaled, rounded to TF32 as math's TF32 GEMMs round it), in the layout of
//    FlashParams (plain or packed); no accumulator buffers, no conversion pass. Nothing of
//    size Q×K exists.
#include <algorithm>
#include <utility>

#include "tensor/cuda/cuda_flash_tf32.cuh"

namespace loom::cuda {

namespace {

// delta[r] for the rows r = n·q_len + i (one warp per row; O and dO in either layout).
__global__ void flash_delta_tf32_kernel(const FlashParams p, int d) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.n * p.q_len) return;
  const FlashRows rows = flash_rows(p, r / p.q_len, p.q_len, d);
  const int64_t off = rows.base + (r % p.q_len) * rows.stride;
  const float* dout = static_cast<const float*>(p.grad_out) + off;
  const float* out = static_cast<const float*>(p.out) + off;
  float sum = 0;
  for (int c = lane; c < d; c += 32) sum += __uint_as_float(to_tf32(dout[c])) * out[c];
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) static_cast<float*>(p.delta)[r] = sum;
}

template <int D>
struct Tf32BwdShape {
  using S = Tf32Shape<D>;
  // K, V, dS, and per stage Q, dO, lse, delta
  static constexpr size_t kFixed = size_t(2 * S::kCols * S::kLd + S::kRows * S::kLdS) * sizeof(float);
  static constexpr size_t kStage = size_t(2 * S::kRows * S::kLd + 2 * S::kRows) * sizeof(float);
  // Blocks per SM that shared memory allows (228 KB per SM, 1 KB of it reserved per block).
  static constexpr int blocks_per_sm(int stages) {
    return kFixed + stages * kStage > 227 * 1024 ? 0 : int(228 * 1024 / (kFixed + stages * kStage + 1024));
  }
  // Double-buffered unless one stage lets more blocks share an SM (d = 40…80: the other blocks
  // then hide the copy) or two do not fit (d = 160).
  static constexpr int kStages = blocks_per_sm(2) >= blocks_per_sm(1) && blocks_per_sm(2) > 0 ? 2 : 1;
  static constexpr size_t kSmem = kFixed + kStages * kStage;
  // dQ's columns per pass, in n-tiles of 8: the largest divisor of D / 8 up to 10 (at most 40
  // accumulator registers): 5, 8, 9, 10, 6, 8, 10 for d = 40 … 160
  static constexpr int kDqChunk = D / 8 <= 10 ? D / 8 : D / 8 % 10 == 0 ? 10 : D / 8 % 8 == 0 ? 8 : 6;
  static_assert(D / 8 % kDqChunk == 0, "dQ chunks must tile the head dim");
};
static_assert(Tf32BwdShape<160>::kSmem <= 227 * 1024, "the backward's shared memory exceeds 227 KB");
static_assert(Tf32BwdShape<40>::kStages == 1 && Tf32BwdShape<80>::kStages == 1 && Tf32BwdShape<96>::kStages == 2 &&
                  Tf32BwdShape<128>::kStages == 2 && Tf32BwdShape<160>::kStages == 1,
              "the stage counts the comment at the top describes");

// Adds the pair (x, y) at row `row`, columns c, c + 1 of a gradient in the params' layout.
__device__ __forceinline__ void add_grad(float* grad, const FlashRows& rows, int64_t row, int c, float x, float y) {
  atomic_add2(grad + rows.base + row * rows.stride + c, x, y);
}

template <int D>
__global__ void __launch_bounds__(Tf32Shape<D>::kThreads) flash_bwd_tf32_kernel(const FlashParams p,
                                                                                  int query_tiles_per_block) {
  using S = Tf32Shape<D>;
  using B = Tf32BwdShape<D>;
  constexpr int kLd = S::kLd, kRows = S::kRows, kCols = S::kCols, kLdS = S::kLdS, kT = S::kThreads;
  constexpr int kStages = B::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sK = reinterpret_cast<float*>(smem_raw);  // [kCols][kLd]
  float* sV = sK + kCols * kLd;                    // [kCols][kLd]
  float* sdS = sV + kCols * kLd;                   // [kRows][kLdS]: dS, [query][key]
  float* sQ0 = sdS + kRows * kLdS;                 // Q and dO: [stage][kRows][kLd]
  float* sdO0 = sQ0 + kStages * kRows * kLd;
  float* sL0 = sdO0 + kStages * kRows * kLd;  // [stage][kRows]: raw lse (natural log)
  float* sD0 = sL0 + kStages * kRows;         // [stage][kRows]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t n = blockIdx.y, j0 = int64_t(blockIdx.x) * kCols;
  const FlashRows qr = flash_rows(p, n, p.q_len, D), kr = flash_rows(p, n, p.k_len, D);
  const float* q = static_cast<const float*>(p.q) + qr.base;
  const float* k = static_cast<const float*>(p.k) + kr.base;
  const float* v = static_cast<const float*>(p.v) + kr.base;
  const float* dout = static_cast<const float*>(p.grad_out) + qr.base;
  const float* lse = static_cast<const float*>(p.lse) + n * p.q_len;
  const float* delta = static_cast<const float*>(p.delta) + n * p.q_len;
  const float* mask = static_cast<const float*>(p.mask);
  const float sl2 = float(p.scale) * kLog2e, scale = float(p.scale);

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;
  const int kr0 = warp * 16;  // this warp's key rows in the tile
  const int64_t key[2] = {j0 + kr0 + g, j0 + kr0 + g + 8};

  // query tiles of this block: [first, last)
  const int64_t all_tiles = (p.q_len + kRows - 1) / kRows;
  int64_t first = int64_t(blockIdx.z) * query_tiles_per_block;
  const int64_t last = min(all_tiles, first + query_tiles_per_block);
  if (p.causal) first = max(first, j0 / kRows);  // earlier query tiles see none of these keys

  // Q, dO, lse, delta of query tile `it` into stage `st` (zero past q_len: such rows then have
  // dO = 0 and D = 0, so whatever P they get adds nothing to dV, dK, and dQ skips them).
  auto load_query_tile = [&](int64_t it, int st) {
    const int64_t i0 = it * kRows;
    load_rows_f32<D>(sQ0 + st * kRows * kLd, kLd, q, i0, kRows, p.q_len, qr.stride, tid, kT);
    load_rows_f32<D>(sdO0 + st * kRows * kLd, kLd, dout, i0, kRows, p.q_len, qr.stride, tid, kT);
    for (int r = tid; r < 2 * kRows; r += kT) {
      const int rr = r % kRows;
      const bool in = i0 + rr < p.q_len;
      if (r < kRows) cp_async4(sL0 + st * kRows + rr, in ? lse + i0 + rr : lse, in);
      else cp_async4(sD0 + st * kRows + rr, in ? delta + i0 + rr : delta, in);
    }
  };

  load_rows_f32<D>(sK, kLd, k, j0, kCols, p.k_len, kr.stride, tid, kT);
  load_rows_f32<D>(sV, kLd, v, j0, kCols, p.k_len, kr.stride, tid, kT);
  if (first < last) load_query_tile(first, 0);
  cp_async_commit();

  for (int64_t it = first; it < last; ++it) {
    const int64_t i0 = it * kRows;
    const int st = kStages == 2 ? int((it - first) & 1) : 0;
    const float* sQ = sQ0 + st * kRows * kLd;
    const float* sdO = sdO0 + st * kRows * kLd;
    const float* sL = sL0 + st * kRows;
    const float* sD = sD0 + st * kRows;
    cp_async_wait_all();
    __syncthreads();  // tile it landed; every warp is done with tile it − 1 (dS, the other stage)
    if (kStages == 2 && it + 1 < last) load_query_tile(it + 1, st ^ 1);
    cp_async_commit();

    // Sᵀ = K·Qᵀ: 16 keys × 64 queries per warp
    float sc[kRows / 8][4];
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 8; ++kk) {
      uint32_t a[4];
      frag_a(a, sK, kr0, kk * 8, kLd, g, t);
#pragma unroll
      for (int j = 0; j < kRows / 8; ++j) {
        uint32_t b[2];
        frag_b_nk(b, sQ, j * 8, kk * 8, kLd, g, t);
        mma_tf32(sc[j], a, b);
      }
    }
    // Pᵀ = exp2(s2 − L2); bounds, causal and mask only on the last / diagonal tiles or with a mask
    const bool plain = !mask && j0 + kCols <= p.k_len && (!p.causal || i0 >= j0 + kCols - 1);
#pragma unroll
    for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int ql = j * 8 + 2 * t + (e & 1);
        if (plain) {
          sc[j][e] = fast_exp2(fmaf(sc[j][e], sl2, -sL[ql] * kLog2e));
          continue;
        }
        const int64_t qi = i0 + ql, kj = key[e / 2];
        float x = sc[j][e] * sl2;
        if (kj >= p.k_len || (p.causal && kj > qi)) x = -INFINITY;
        else if (mask && qi < p.q_len) x += mask_log2_f32(p, mask, n, qi, kj);
        sc[j][e] = fast_exp2(x - sL[ql] * kLog2e);
      }
    }
    // dV += Pᵀ·dO (Pᵀ from the accumulators, kPair; dO a [query][d] tile)
#pragma unroll
    for (int kk = 0; kk < kRows / 8; ++kk) {
      uint32_t a[4];
      frag_a_acc(a, sc[kk]);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        uint32_t b[2];
        frag_b_kn(b, sdO, kk * 8, j * 8, kLd, g, t);
        mma_tf32(dv[j], a, b);
      }
    }
    // dPᵀ = V·dOᵀ, then dSᵀ = Pᵀ∘(dPᵀ − D), kept in sc and stored [query][key]
    {
      float dpt[kRows / 8][4];
#pragma unroll
      for (int j = 0; j < kRows / 8; ++j) dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 8; ++kk) {
        uint32_t a[4];
        frag_a(a, sV, kr0, kk * 8, kLd, g, t);
#pragma unroll
        for (int j = 0; j < kRows / 8; ++j) {
          uint32_t b[2];
          frag_b_nk(b, sdO, j * 8, kk * 8, kLd, g, t);
          mma_tf32(dpt[j], a, b);
        }
      }
#pragma unroll
      for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ql = j * 8 + 2 * t + (e & 1);
          const float ds = sc[j][e] * (dpt[j][e] - sD[ql]);
          sc[j][e] = ds;
          sdS[ql * kLdS + kr0 + g + (e / 2) * 8] = ds;
        }
      }
    }
    // dK += dSᵀ·Q (dSᵀ from the accumulators, kPair; Q a [query][d] tile; scale applied at the end)
#pragma unroll
    for (int kk = 0; kk < kRows / 8; ++kk) {
      uint32_t a[4];
      frag_a_acc(a, sc[kk]);
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        uint32_t b[2];
        frag_b_kn(b, sQ, kk * 8, j * 8, kLd, g, t);
        mma_tf32(dk[j], a, b);
      }
    }
    __syncthreads();  // dS complete in shared memory
    // dQ += scale·dS·K: warp w the queries 16w…16w+15, in column chunks (dS a kPair
    // [query][key] tile, K a [key][d] tile), added into dq
    if (p.dq) {
      const int qs = warp * 16;
#pragma unroll 1
      for (int c0 = 0; c0 < D / 8; c0 += B::kDqChunk) {
        float acc[B::kDqChunk][4];
#pragma unroll
        for (int j = 0; j < B::kDqChunk; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kCols / 8; ++kk) {
          uint32_t a[4];
          frag_a_pair(a, sdS, qs, kk * 8, kLdS, g, t);
#pragma unroll
          for (int j = 0; j < B::kDqChunk; ++j) {
            uint32_t b[2];
            frag_b_kn(b, sK, kk * 8, (c0 + j) * 8, kLd, g, t);
            mma_tf32(acc[j], a, b);
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t qi = i0 + qs + g + 8 * h;
          if (qi >= p.q_len) continue;
#pragma unroll
          for (int j = 0; j < B::kDqChunk; ++j)
            add_grad(static_cast<float*>(p.dq), qr, qi, (c0 + j) * 8 + 2 * t, scale * acc[j][2 * h],
                     scale * acc[j][2 * h + 1]);
        }
      }
    }
    if (kStages == 1) {
      __syncthreads();  // every warp is done with this stage's Q and dO
      if (it + 1 < last) load_query_tile(it + 1, 0);
      cp_async_commit();
    }
  }
  cp_async_wait_all();  // a block with no query tile (causal) still has K/V copies in flight
  // dK, dV of this block's keys
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t kj = key[h];
    if (kj >= p.k_len) continue;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      if (p.dk)
        add_grad(static_cast<float*>(p.dk), kr, kj, j * 8 + 2 * t, scale * dk[j][2 * h], scale * dk[j][2 * h + 1]);
      if (p.dv_out) add_grad(static_cast<float*>(p.dv_out), kr, kj, j * 8 + 2 * t, dv[j][2 * h], dv[j][2 * h + 1]);
    }
  }
}

// Query tiles per block: split them over blocks until the grid fills the GPU about twice.
int64_t tf32_query_tiles_per_block(int64_t key_blocks, int64_t n, int64_t query_tiles) {
  const int64_t want = 2 * int64_t(flash_sm_count());
  int64_t splits = 1;
  while (key_blocks * n * splits < want && splits < query_tiles) splits *= 2;
  splits = std::min(splits, query_tiles);
  return (query_tiles + splits - 1) / splits;
}

template <int D>
void tf32_backward(const FlashParams& p) {
  using S = Tf32Shape<D>;
  const int64_t rows = p.n * p.q_len;
  flash_delta_tf32_kernel<<<unsigned((rows + 7) / 8), 256, 0, compute_stream()>>>(p, D);
  check_last_launch("flash_delta_tf32_kernel");
  // the gradients are added into: zero them first (either layout covers n·len·D floats)
  for (auto [ptr, len] : {std::pair{p.dq, p.q_len}, std::pair{p.dk, p.k_len}, std::pair{p.dv_out, p.k_len}})
    if (ptr) LOOM_CUDA_CHECK(cudaMemsetAsync(ptr, 0, size_t(p.n * len) * D * sizeof(float), compute_stream()));

  constexpr size_t smem = Tf32BwdShape<D>::kSmem;
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_tf32_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int64_t key_blocks = (p.k_len + S::kCols - 1) / S::kCols;
  const int64_t query_tiles = (p.q_len + S::kRows - 1) / S::kRows;
  const int64_t per_block = tf32_query_tiles_per_block(key_blocks, p.n, query_tiles);
  const int64_t splits = (query_tiles + per_block - 1) / per_block;
  const dim3 grid(unsigned(key_blocks), unsigned(p.n), unsigned(splits));
  flash_bwd_tf32_kernel<D><<<grid, S::kThreads, smem, compute_stream()>>>(p, int(per_block));
  check_last_launch("flash_bwd_tf32_kernel");
}

}  // namespace

void flash_tf32_backward(const FlashParams& p) {
  LOOM_CHECK(p.dtype == DType::F32, "flash_tf32_backward: dtype ", p.dtype, " is not f32");
  dispatch_head_dim(p.d, " in f32 with TF32", [&](auto dim) { tf32_backward<decltype(dim)::value>(p); });
}

}  // namespace loom::cuda
