// The tensor-core backward (bf16 / f16); see cuda_flash_fwd.cu for the layouts and cuda_flash.h
// for the contract.
#include <algorithm>
#include <cstdlib>
#include <string>

#include "tensor/cuda/cuda_flash_tc.cuh"
#include "tensor/determinism.h"

namespace loom::cuda {

namespace {

// delta[r] = Σ_c dO[r, c]·O[r, c] for the rows r = n·q_len + i of the problem (one warp per row;
// O and dO in either layout of FlashParams); dQ's f32 accumulator rows [r][d] zeroed on the way
// (when there is one: one launch instead of a memset more).
template <typename T>
__global__ void flash_delta_half_kernel(const FlashParams p, int d) {
  const int64_t r = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= p.n * p.q_len) return;
  if (p.dq_accum)
    for (int c = lane; c < d; c += 32) p.dq_accum[r * d + c] = 0.f;
  const FlashRows rows = flash_rows(p, r / p.q_len, p.q_len, d);
  const int64_t off = rows.base + (r % p.q_len) * rows.stride;
  const T* dout = static_cast<const T*>(p.grad_out) + off;
  const T* out = static_cast<const T*>(p.out) + off;
  float sum = 0;
  for (int c = lane; c < d; c += 32) sum += Half2<T>::to_float(dout[c]) * Half2<T>::to_float(out[c]);
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) static_cast<float*>(p.delta)[r] = sum;
}

// The same with kLanes lanes per row (32 / kLanes rows per warp), each lane reading 8 elements of
// O and of dO as one 16-byte load (and zeroing those 8 of dQ's accumulator row): for d a multiple
// of 8 up to 8·kLanes, rows 16-byte aligned (the tensor-core kernels' cp.async tiles need that
// too; run_bwd checks it).
template <typename T, int kLanes>
__global__ void flash_delta_vec_kernel(const FlashParams p, int d) {
  const int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  const int lane = threadIdx.x % kLanes, c = 8 * lane;
  float sum = 0;
  if (r < p.n * p.q_len && c < d) {
    const FlashRows rows = flash_rows(p, r / p.q_len, p.q_len, d);
    const int64_t off = rows.base + (r % p.q_len) * rows.stride + c;
    const uint4 go = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.grad_out) + off);
    const uint4 o = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + off);
    const T* a = reinterpret_cast<const T*>(&go);
    const T* b = reinterpret_cast<const T*>(&o);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += Half2<T>::to_float(a[e]) * Half2<T>::to_float(b[e]);
    if (p.dq_accum) {
      float4* acc = reinterpret_cast<float4*>(p.dq_accum + r * d + c);
      acc[0] = acc[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int o = kLanes / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0 && r < p.n * p.q_len) static_cast<float*>(p.delta)[r] = sum;
}

// delta = rowsum(dO∘O) for the tensor-core backward: the vector kernel where rows are 16-byte
// aligned (8 lanes per row up to d = 64, 16 up to 128, 32 up to 256), else one warp per row.
template <typename T>
void launch_flash_delta(const FlashParams& p, int d) {
  const int64_t rows = p.n * p.q_len;
  const int64_t stride = p.packed ? int64_t(p.heads) * d : d;
  const bool aligned = d % 8 == 0 && stride % 8 == 0 && d <= 256 &&
                       (reinterpret_cast<uintptr_t>(p.out) | reinterpret_cast<uintptr_t>(p.grad_out)) % 16 == 0;
  if (!aligned) {
    flash_delta_half_kernel<T><<<unsigned((rows + 7) / 8), 256, 0, compute_stream()>>>(p, d);
    return check_last_launch("flash_delta_half_kernel");
  }
  auto launch = [&](auto* kernel, int lanes) {
    const int64_t threads = rows * lanes;
    kernel<<<unsigned((threads + 255) / 256), 256, 0, compute_stream()>>>(p, d);
    check_last_launch("flash_delta_vec_kernel");
  };
  if (d <= 64) return launch(flash_delta_vec_kernel<T, 8>, 8);
  if (d <= 128) return launch(flash_delta_vec_kernel<T, 16>, 16);
  launch(flash_delta_vec_kernel<T, 32>, 32);
}

// dst = T(src·scale): src an f32 accumulator [n, len, d], dst the gradient in the params' layout;
// kVec consecutive elements per thread and step (kVec = 4: d a multiple of 4, dst 8-byte aligned,
// src 16-byte aligned: one float4 load and one 8-byte store).
template <typename T, int kVec>
__global__ void flash_convert_kernel(T* dst, const float* src, FlashParams p, int64_t len, int d, float scale) {
  const int64_t count = p.n * len * d / kVec;
  for (int64_t v = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; v < count; v += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = v * kVec;
    int64_t at = i;
    if (p.packed) {
      const int64_t row = i / d;
      const FlashRows rows = flash_rows(p, row / len, len, d);
      at = rows.base + (row % len) * rows.stride + (i - row * d);
    }
    if constexpr (kVec == 4) {
      const float4 x = *reinterpret_cast<const float4*>(src + i);
      uint2 packed;
      packed.x = Half2<T>::pack(x.x * scale, x.y * scale);
      packed.y = Half2<T>::pack(x.z * scale, x.w * scale);
      *reinterpret_cast<uint2*>(dst + at) = packed;
    } else {
      dst[at] = Half2<T>::from_float(src[i] * scale);
    }
  }
}

// dQ[rows i0 + 16·slice …, n-blocks kNb0 … kNb1 − 1 of 8 columns] += dS·K over the block's kCols
// keys: dS [kRows][kCols + 8] and K [kCols][kLd] in shared memory; f32 atomics into p.dq_accum.
template <typename T, int D, int kCols, int kNb0, int kNb1>
__device__ __forceinline__ void dq_part(const FlashParams& p, const T* sdS, const T* sK, int64_t n, int64_t i0,
                                        int slice, int lane) {
  constexpr int kLd = TcShape<D>::kLd, kLdS = kCols + 8, kNb = kNb1 - kNb0;
  const int g = lane / 4, t = lane % 4;
  float acc[kNb][4];
#pragma unroll
  for (int j = 0; j < kNb; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kCols / 16; ++kk) {
    uint32_t a[4];
    ldsm_a(a, sdS, slice * 16, kk * 16, kLdS, lane);
#pragma unroll
    for (int j = 0; j + 1 < kNb; j += 2) {
      uint32_t b[4];
      ldsm_b_trans_pair(b, sK, kk * 16, (kNb0 + j) * 8, kLd, lane);
      mma16816(acc[j], a, b, T());
      mma16816(acc[j + 1], a, b + 2, T());
    }
    if constexpr (kNb % 2 == 1) {
      uint32_t b[2];
      ldmatrix_b_trans(b, sK, kk * 16, (kNb1 - 1) * 8, kLd, lane);
      mma16816(acc[kNb - 1], a, b, T());
    }
  }
  float* dq = p.dq_accum + (n * p.q_len + i0 + slice * 16) * D + kNb0 * 8;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = g + h * 8;
    if (i0 + slice * 16 + r >= p.q_len) continue;
#pragma unroll
    for (int j = 0; j < kNb; ++j) atomic_add2(dq + r * D + j * 8 + 2 * t, acc[j][2 * h], acc[j][2 * h + 1]);
  }
}

// The backward kernel: one block per 16·kAtoms·kKeySlices keys (and query split), looping over
// 64-query tiles. Its kKeySlices·kQSplit warps: kAtoms 16-key atoms per warp (keys kr0 … kr0 +
// 16·kAtoms − 1), kQSplit warps over the query tile (each takes kRows / kQSplit of its queries). Every product's B fragment (Q, dO) feeds kAtoms mma per
// ldmatrix, so shared-memory traffic per mma falls as kAtoms grows; the dK / dV accumulators grow
// with it (kAtoms·D/2 registers each), which is why the wide layout is for small head dims.
// (BwdLayout below names the ones built.) The warps of one key slice add their partial dK, dV
// into the f32 buffers like query splits. Fewer keys per block mean more dQ atomics: every block
// adds its [64 × d] dQ share of each query tile.
template <typename T, int D, int kAtoms, int kKeySlices, int kQSplit>
__global__ void __launch_bounds__(32 * kKeySlices * kQSplit)
    flash_bwd_tc_kernel(const FlashParams p, int query_tiles_per_block) {
  using S = TcShape<D>;
  constexpr int kDp = S::kDp, kLd = S::kLd, kRows = S::kRows;
  constexpr int kCols = 16 * kAtoms * kKeySlices, kWarps = kKeySlices * kQSplit, kThreads = 32 * kWarps;
  constexpr int kLdS = kCols + 8;       // dS tile [kRows][kLdS]
  constexpr int kQw = kRows / kQSplit;  // queries per warp per tile
  constexpr int kDSplit = kWarps / (kRows / 16);  // warps over d in dQ += dS·K (1 or 2)
  static_assert(kQw % 16 == 0 && (kDSplit == 1 || kDSplit == 2) && kWarps % (kRows / 16) == 0,
                "the warp layout must cover the tile");
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
  const FlashRows qr = flash_rows(p, n, p.q_len, D), kr = flash_rows(p, n, p.k_len, D);
  const T* q = static_cast<const T*>(p.q) + qr.base;
  const T* k = static_cast<const T*>(p.k) + kr.base;
  const T* v = static_cast<const T*>(p.v) + kr.base;
  const T* dout = static_cast<const T*>(p.grad_out) + qr.base;
  const float* lse = static_cast<const float*>(p.lse) + n * p.q_len;
  const float* delta = static_cast<const float*>(p.delta) + n * p.q_len;
  const T* mask = static_cast<const T*>(p.mask);
  const float sl2 = float(p.scale) * kLog2e;

  float dk[kAtoms][D / 8][4], dv[kAtoms][D / 8][4];
#pragma unroll
  for (int at = 0; at < kAtoms; ++at)
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[at][j][e] = dv[at][j][e] = 0.f;
  const int kr0 = (warp % kKeySlices) * 16 * kAtoms;  // this warp's key rows in the tile
  const int qw0 = (warp / kKeySlices) * kQw;          // this warp's query rows in the tile

  // query tiles of this block: [first, last)
  const int64_t all_tiles = (p.q_len + kRows - 1) / kRows;
  int64_t first = int64_t(blockIdx.z) * query_tiles_per_block;
  const int64_t last = min(all_tiles, first + query_tiles_per_block);
  if (p.causal) first = max(first, j0 / kRows);  // earlier query tiles see none of these keys

  // Q, dO, lse, delta of query tile `it` into buffer `buf` (zero past q_len: such rows then
  // have dO = 0 and D = 0, so whatever P they get adds nothing to dV, dK, and dQ skips them).
  auto load_query_tile = [&](int64_t it, int buf) {
    const int64_t i0 = it * kRows;
    load_tile_async<T, kDp>(sQ0 + buf * kRows * kLd, kLd, q, i0, kRows, p.q_len, D, qr.stride, tid, kThreads);
    load_tile_async<T, kDp>(sdO0 + buf * kRows * kLd, kLd, dout, i0, kRows, p.q_len, D, qr.stride, tid, kThreads);
    for (int r = tid; r < 2 * kRows; r += kThreads) {
      const int rr = r % kRows;
      const bool in = i0 + rr < p.q_len;
      if (r < kRows) cp_async4(sL0 + buf * kRows + rr, in ? lse + i0 + rr : lse, in);
      else cp_async4(sD0 + buf * kRows + rr, in ? delta + i0 + rr : delta, in);
    }
  };

  load_tile_async<T, kDp>(sK, kLd, k, j0, kCols, p.k_len, D, kr.stride, tid, kThreads);
  load_tile_async<T, kDp>(sV, kLd, v, j0, kCols, p.k_len, D, kr.stride, tid, kThreads);
  if (first < last) load_query_tile(first, 0);
  cp_async_commit();

  // Pᵀ-like [kAtoms][kQw/8][4] accumulators → the A fragment of rows atom `at`, queries kk·16…
  auto a_of = [](const float (*x)[4], int kk, uint32_t* a) {
    a[0] = Half2<T>::pack(x[2 * kk][0], x[2 * kk][1]);
    a[1] = Half2<T>::pack(x[2 * kk][2], x[2 * kk][3]);
    a[2] = Half2<T>::pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[3] = Half2<T>::pack(x[2 * kk + 1][2], x[2 * kk + 1][3]);
  };
  // acc[at] += X[at]ᵀ·M, X the warp's [keys × kQw] tile in registers, M rows qw0… of a [kRows][kLd]
  // tile in shared memory (dV += Pᵀ·dO, dK += dSᵀ·Q).
  auto add_xt_m = [&](float (*acc)[D / 8][4], const float (*x)[kQw / 8][4], const T* m) {
#pragma unroll
    for (int kk = 0; kk < kQw / 16; ++kk) {
      uint32_t a[kAtoms][4];
#pragma unroll
      for (int at = 0; at < kAtoms; ++at) a_of(x[at], kk, a[at]);
#pragma unroll
      for (int j = 0; j + 1 < D / 8; j += 2) {
        uint32_t b[4];
        ldsm_b_trans_pair(b, m, qw0 + kk * 16, j * 8, kLd, lane);
#pragma unroll
        for (int at = 0; at < kAtoms; ++at) {
          mma16816(acc[at][j], a[at], b, T());
          mma16816(acc[at][j + 1], a[at], b + 2, T());
        }
      }
      if constexpr (D / 8 % 2 == 1) {
        uint32_t b[2];
        ldmatrix_b_trans(b, m, qw0 + kk * 16, (D / 8 - 1) * 8, kLd, lane);
#pragma unroll
        for (int at = 0; at < kAtoms; ++at) mma16816(acc[at][D / 8 - 1], a[at], b, T());
      }
    }
  };
  // x[at] = A[kr0 + 16·at …]·Mᵀ over the warp's queries: Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ.
  auto a_mt = [&](float (*x)[kQw / 8][4], const T* a_tile, const T* m) {
#pragma unroll
    for (int at = 0; at < kAtoms; ++at)
#pragma unroll
      for (int j = 0; j < kQw / 8; ++j) x[at][j][0] = x[at][j][1] = x[at][j][2] = x[at][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kDp / 16; ++kk) {
      uint32_t a[kAtoms][4];
#pragma unroll
      for (int at = 0; at < kAtoms; ++at) ldsm_a(a[at], a_tile, kr0 + at * 16, kk * 16, kLd, lane);
#pragma unroll
      for (int j = 0; j < kQw / 8; j += 2) {
        uint32_t b[4];
        ldsm_b_pair(b, m, qw0 + j * 8, kk * 16, kLd, lane);
#pragma unroll
        for (int at = 0; at < kAtoms; ++at) {
          mma16816(x[at][j], a[at], b, T());
          mma16816(x[at][j + 1], a[at], b + 2, T());
        }
      }
    }
  };

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

    // Sᵀ = K·Qᵀ: 16·kAtoms keys × kQw queries per warp
    float st[kAtoms][kQw / 8][4];
    a_mt(st, sK, sQ);
    // Pᵀ = exp2(s2 − L2); bounds, causal and mask only on the last / diagonal tiles or with a mask
    const bool plain = !mask && j0 + kCols <= p.k_len && (!p.causal || i0 >= j0 + kCols - 1);
    if (plain) {
#pragma unroll
      for (int at = 0; at < kAtoms; ++at)
#pragma unroll
        for (int j = 0; j < kQw / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            st[at][j][e] = fast_exp2(fmaf(st[at][j][e], sl2, -sL[qw0 + j * 8 + 2 * t + (e & 1)] * kLog2e));
    } else {
#pragma unroll
      for (int at = 0; at < kAtoms; ++at) {
#pragma unroll
        for (int j = 0; j < kQw / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int ql = qw0 + j * 8 + 2 * t + (e & 1);
            const int64_t qi = i0 + ql, kj = j0 + kr0 + at * 16 + g + (e / 2) * 8;
            float x = st[at][j][e] * sl2;
            if (kj >= p.k_len || (p.causal && kj > qi)) x = -INFINITY;
            else if (mask && qi < p.q_len) x += mask_log2(p, mask, n, qi, kj);
            st[at][j][e] = fast_exp2(x - sL[ql] * kLog2e);
          }
        }
      }
    }
    add_xt_m(dv, st, sdO);  // dV += Pᵀ·dO
    // dPᵀ = V·dOᵀ, then dSᵀ = Pᵀ∘(dPᵀ − D)
    float dpt[kAtoms][kQw / 8][4];
    a_mt(dpt, sV, sdO);
#pragma unroll
    for (int at = 0; at < kAtoms; ++at) {
#pragma unroll
      for (int j = 0; j < kQw / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ql = qw0 + j * 8 + 2 * t + (e & 1);
          const float ds = st[at][j][e] * (dpt[at][j][e] - sD[ql]);
          st[at][j][e] = ds;
          if (p.dq_accum) sdS[ql * kLdS + kr0 + at * 16 + g + (e / 2) * 8] = Half2<T>::from_float(ds);
        }
      }
    }
    add_xt_m(dk, st, sQ);  // dK += dSᵀ·Q (scale applied at the end)
    if (p.dq_accum) __syncthreads();  // dS complete in shared memory (uniform: a kernel argument)
    // dQ += dS·K: each warp a 16-query slice (and half of d with 8 warps), into the f32 buffer
    if (p.dq_accum) {
      const int slice = warp % (kRows / 16);
      constexpr int kNb = D / 8, kHalf = (kNb + 1) / 2;
      if (kDSplit == 1) dq_part<T, D, kCols, 0, kNb>(p, sdS, sK, n, i0, slice, lane);
      else if (warp < kRows / 16) dq_part<T, D, kCols, 0, kHalf>(p, sdS, sK, n, i0, slice, lane);
      else dq_part<T, D, kCols, kHalf, kNb>(p, sdS, sK, n, i0, slice, lane);
    }
  }
  cp_async_wait_all();  // a block with no query tile (causal) still has K/V copies in flight
  // dK, dV of this warp's keys into the f32 buffers
#pragma unroll
  for (int at = 0; at < kAtoms; ++at) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t kj = j0 + kr0 + at * 16 + g + h * 8;
      if (kj >= p.k_len) continue;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int64_t off = (n * p.k_len + kj) * D + j * 8 + 2 * t;
        if (p.dk_accum) atomic_add2(p.dk_accum + off, dk[at][j][2 * h], dk[at][j][2 * h + 1]);
        if (p.dv_accum) atomic_add2(p.dv_accum + off, dv[at][j][2 * h], dv[at][j][2 * h + 1]);
      }
    }
  }
}

template <int D, int kCols>
size_t tc_bwd_smem() {
  using S = TcShape<D>;
  // K, V; Q and dO double-buffered; dS; lse and delta double-buffered
  return size_t(2 * kCols + 4 * S::kRows) * S::kLd * 2 + size_t(S::kRows) * (kCols + 8) * 2 +
         4 * S::kRows * sizeof(float);
}

// The warp layouts built: <kAtoms, kKeySlices, kQSplit> of flash_bwd_tc_kernel.
//   narrow64   <1, 4, 1>  64 keys, 4 warps × 16 keys × 64 queries
//   narrow128  <1, 8, 1>  128 keys, 8 warps × 16 keys × 64 queries
//   wide64     <2, 2, 2>  64 keys, 4 warps × 32 keys × 32 queries (d ≤ 64: registers)
//   wide128    <2, 4, 2>  128 keys, 8 warps × 32 keys × 32 queries (d ≤ 64)
enum class BwdLayout { Narrow64, Narrow128, Wide64, Wide128 };

// The layout for head dim D: the measured best (docs/flash-notes.md), or LOOM_FLASH_BWD_LAYOUT
// (narrow64 | narrow128 | wide64 | wide128; read at every call so that one benchmark run or test
// can compare them; a wide layout asked for at d > 64 falls back to its narrow twin).
template <int D>
BwdLayout bwd_layout() {
  // H200, 2026-11-30 (docs/flash-notes.md): d = 40 narrow64 (1.094 ms at (2,8,4096,40) against
  // 1.17–1.20 for the others: its 165 registers let 3 blocks share an SM), d = 64 wide128 (1.335
  // against 1.45–1.54), d ≥ 72 narrow128 (d = 80: 0.172 against 0.190 ms).
  BwdLayout l = D == 40 ? BwdLayout::Narrow64 : D <= 64 ? BwdLayout::Wide128 : BwdLayout::Narrow128;
  if (const char* v = std::getenv("LOOM_FLASH_BWD_LAYOUT")) {
    const std::string s = v;
    if (s == "narrow64") l = BwdLayout::Narrow64;
    else if (s == "narrow128") l = BwdLayout::Narrow128;
    else if (s == "wide64") l = D <= 64 ? BwdLayout::Wide64 : BwdLayout::Narrow64;
    else if (s == "wide128") l = D <= 64 ? BwdLayout::Wide128 : BwdLayout::Narrow128;
    else LOOM_FAIL("LOOM_FLASH_BWD_LAYOUT=", s, ": expected narrow64, narrow128, wide64 or wide128");
  }
  return l;
}

// The grid of a key-stationary backward whose blocks take kCols keys with kThreadsPerBlock threads:
// the query tiles (64 queries) are split over blocks until the grid fills the GPU about twice (in
// warps).
struct BwdGrid {
  int64_t key_blocks, splits, per_block;
};

// LOOM_FLASH_BWD_SPLITS=N: split every key block's query tiles over N blocks (a benchmark knob:
// measures the grid's wave quantisation against the f32 dK / dV accumulators that splits need).
// Unset or 0: the grid below chooses.
int64_t forced_bwd_splits() {
  const char* env = std::getenv("LOOM_FLASH_BWD_SPLITS");
  if (!env || !*env) return 0;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  LOOM_CHECK(*end == '\0' && v >= 0 && v <= 4096, "LOOM_FLASH_BWD_SPLITS='", env, "' is not a count from 0 to 4096");
  return int64_t(v);
}
BwdGrid bwd_grid(const FlashParams& p, int kCols, int kThreadsPerBlock) {
  constexpr int kRows = 64;  // TcShape<D>::kRows, the wgmma kernel's kBwdRows
  const int64_t key_blocks = (p.k_len + kCols - 1) / kCols;
  const int64_t query_tiles = (p.q_len + kRows - 1) / kRows;
  if (query_tiles == 0) return {key_blocks, 1, 1};  // no query: one block per key range writes zeros
  const int64_t want = 2 * int64_t(flash_sm_count()) * 4 / (kThreadsPerBlock / 32) + 1;
  int64_t splits = 1;
  while (key_blocks * p.n * splits < want && splits < query_tiles) splits *= 2;
  if (const int64_t forced = forced_bwd_splits(); forced > 0) splits = forced;
  if (deterministic_algorithms()) splits = 1;  // dK / dV without atomics across blocks (tensor/determinism.h)
  splits = std::min(splits, query_tiles);
  const int64_t per_block = (query_tiles + splits - 1) / splits;
  return {key_blocks, (query_tiles + per_block - 1) / per_block, per_block};
}

// D = rowsum(dO∘O), the zeroed f32 accumulators, launch(grid, query tiles per block, direct_kv) of
// a kernel whose blocks take kCols keys and 64-query tiles with kThreadsPerBlock threads, the
// conversions. direct_kv (only where kv_direct_ok, the kernel can write dK, dV itself, and the
// query tiles are not split over blocks): dK, dV skip their accumulators and conversions (which
// the caller then need not allocate: flash_tc_backward_writes_kv).
template <typename T, int D, typename Launch>
void run_bwd(const FlashParams& p, int kCols, int kThreadsPerBlock, bool kv_direct_ok, Launch&& launch) {
  static_assert(TcShape<D>::kRows == 64, "bwd_grid counts 64-query tiles");
  launch_flash_delta<T>(p, D);  // also zeroes dq_accum [rows][D]

  const BwdGrid g = bwd_grid(p, kCols, kThreadsPerBlock);
  const bool direct_kv = kv_direct_ok && g.splits == 1;
  if (!direct_kv) {
    LOOM_CHECK(p.dk_accum && p.dv_accum, "flash backward: the dK / dV accumulators were not allocated although the "
               "query tiles are split over ", g.splits, " blocks");
    const size_t kv = size_t(p.n * p.k_len) * D * sizeof(float);
    LOOM_CUDA_CHECK(cudaMemsetAsync(p.dk_accum, 0, kv, compute_stream()));
    LOOM_CUDA_CHECK(cudaMemsetAsync(p.dv_accum, 0, kv, compute_stream()));
  }
  launch(dim3(unsigned(g.key_blocks), unsigned(p.n), unsigned(g.splits)), int(g.per_block), direct_kv);

  const float scale = float(p.scale);
  auto convert = [&](void* dst, const float* src, int64_t len, float s) {
    if (!dst) return;
    const bool vec = D % 4 == 0 && reinterpret_cast<uintptr_t>(dst) % 8 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
    if (vec)
      flash_convert_kernel<T, 4><<<grid_for(p.n * len * D / 4), kThreads, 0, compute_stream()>>>(static_cast<T*>(dst),
                                                                                             src, p, len, D, s);
    else
      flash_convert_kernel<T, 1><<<grid_for(p.n * len * D), kThreads, 0, compute_stream()>>>(static_cast<T*>(dst), src,
                                                                                          p, len, D, s);
    check_last_launch("flash_convert_kernel");
  };
  if (p.dq_accum) convert(p.dq, p.dq_accum, p.q_len, scale);
  else if (p.dq) flash_tc_dq_separate(p);  // LOOM_FLASH_BWD_DQ=separate (the host left dq_accum null)
  if (direct_kv) return;
  convert(p.dk, p.dk_accum, p.k_len, scale);
  convert(p.dv_out, p.dv_accum, p.k_len, 1.f);
}

// The mma.sync kernel in the warp layout <kAtoms, kKeySlices, kQSplit>.
template <typename T, int D, int kAtoms, int kKeySlices, int kQSplit>
void run_bwd_tc(const FlashParams& p) {
  constexpr int kCols = 16 * kAtoms * kKeySlices, kThreadsPerBlock = 32 * kKeySlices * kQSplit;
  run_bwd<T, D>(p, kCols, kThreadsPerBlock, false, [&](dim3 grid, int per_block, bool) {
    const size_t smem = tc_bwd_smem<D, kCols>();
    auto kernel = flash_bwd_tc_kernel<T, D, kAtoms, kKeySlices, kQSplit>;
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, kThreadsPerBlock, smem, compute_stream()>>>(p, per_block);
    check_last_launch("flash_bwd_tc_kernel");
  });
}

// Whether the backward of p runs on wgmma (cuda_flash.h). By default: at both of its head dims on a
// device that has it (H200, docs/gpu-bench.md run 12: (2,8,4096,64) fwd+bwd 0.975 against the
// mma.sync kernel's 1.344 ms in run 11; (2,8,4096,40) 0.817 against 1.076). LOOM_FLASH_BWD=mma /
// wgmma force either (wgmma: d = 40 or 64).
bool backward_on_wgmma(const FlashParams& p) { return flash_wgmma_chosen(p, "LOOM_FLASH_BWD", true); }

// The grid tc_backward's wgmma path launches (keys per block, 128 threads per 64 keys): the one
// flash_tc_backward_writes_kv asks about.
BwdGrid wgmma_bwd_grid(const FlashParams& p) {
  const int keys = flash_wgmma_backward_keys(p.d);
  return bwd_grid(p, keys, 2 * keys);
}

template <typename T, int D>
void tc_backward(const FlashParams& p) {
  if (backward_on_wgmma(p)) {  // blocks of 1 or 2 warpgroups × 64 keys (cuda_flash_wgmma_bwd.cu)
    const int keys = flash_wgmma_backward_keys(p.d);
    return run_bwd<T, D>(p, keys, 2 * keys, true, [&](dim3 grid, int per_block, bool direct_kv) {
      flash_wgmma_backward_launch(p, keys, grid.x, grid.z, per_block, direct_kv);
    });
  }
  const BwdLayout l = bwd_layout<D>();
  if constexpr (D <= 64) {
    if (l == BwdLayout::Wide64) return run_bwd_tc<T, D, 2, 2, 2>(p);
    if (l == BwdLayout::Wide128) return run_bwd_tc<T, D, 2, 4, 2>(p);
  }
  if (l == BwdLayout::Narrow64) return run_bwd_tc<T, D, 1, 4, 1>(p);
  return run_bwd_tc<T, D, 1, 8, 1>(p);
}

template <typename T>
void flash_tc_backward_for(const FlashParams& p) {
  dispatch_head_dim(p.d, "", [&](auto dim) { tc_backward<T, decltype(dim)::value>(p); });
}

}  // namespace

bool flash_tc_backward_writes_kv(const FlashParams& p) {
  if (p.dtype != DType::BF16 && p.dtype != DType::F16) return false;
  if (!flash_wgmma_head_dim(p.d) || p.dv != p.d || !backward_on_wgmma(p)) return false;
  return wgmma_bwd_grid(p).splits == 1;
}

void flash_tc_backward(const FlashParams& p) {
  if (p.dtype == DType::BF16) return flash_tc_backward_for<__nv_bfloat16>(p);
  if (p.dtype == DType::F16) return flash_tc_backward_for<__half>(p);
  LOOM_FAIL("flash_tc_backward: dtype ", p.dtype, " is not bf16 / f16");
}

}  // namespace loom::cuda
