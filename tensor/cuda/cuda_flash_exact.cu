// The exact flash family (f32 / f64): one thread per query row (forward, dQ) or per key row
// (dK, dV), tiles of the other side staged in shared memory; the CPU flash algorithm in FMA.
// Contract: cuda_flash.h.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_flash.h"

namespace loom::cuda {

namespace {

// delta[r] = Σ_c dO[r, c]·O[r, c] in f32, one warp per row.
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
constexpr int kExactThreads = 64;  // rows per block (one per thread)
constexpr int kExactTile = 32;     // rows of the other side staged per step

// kExactUnrollNote: loops over the head dim unroll fully up to 64 (the per-thread rows then live
// in registers); above, the rows live in local memory either way and a full unroll of 160 / 256
// iterations only multiplies the compile time (this file took 13 minutes on two cores), so they
// unroll by 8.

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
  constexpr int kUnroll = MAXD <= 64 ? MAXD : 8;  // see kExactUnrollNote
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
#pragma unroll kUnroll
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
#pragma unroll kUnroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) dot += qr[c] * sK[jj * d + c];
      const T s = exact_score(p, mask, n, qi, j0 + jj, dot);
      const T m_new = s > m ? s : m;
      const T shift = m_new == T(-INFINITY) ? T(0) : m_new;
      const T corr = exp(m - shift), e = exp(s - shift);
      l = l * corr + e;
#pragma unroll kUnroll
      for (int c = 0; c < MAXD; ++c)
        if (c < dv) o[c] = o[c] * corr + e * sV[jj * dv + c];
      m = m_new;
    }
  }
  if (!active) return;
  T* out = static_cast<T*>(p.out) + (n * p.q_len + qi) * dv;
#pragma unroll kUnroll
  for (int c = 0; c < MAXD; ++c)
    if (c < dv) out[c] = o[c] / l;
  static_cast<T*>(p.lse)[n * p.q_len + qi] = m + log(l);
}

// dK, dV: one thread per key; the query side staged (Q, dO, L, D).
template <typename T, int MAXD>
__global__ void __launch_bounds__(kExactThreads) flash_bwd_kv_exact_kernel(const FlashParams p) {
  constexpr int kUnroll = MAXD <= 64 ? MAXD : 8;  // see kExactUnrollNote
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
#pragma unroll kUnroll
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
#pragma unroll kUnroll
      for (int c = 0; c < MAXD; ++c) {
        if (c < d) dot += kr[c] * sQ[ii * d + c];
        if (c < dv) dp += vr[c] * sdO[ii * dv + c];
      }
      const T pr = exp(exact_score(p, mask, n, i0 + ii, kj, dot) - sL[ii]);
      const T ds = pr * (dp - sD[ii]);
#pragma unroll kUnroll
      for (int c = 0; c < MAXD; ++c) {
        if (c < dv) dvv[c] += pr * sdO[ii * dv + c];
        if (c < d) dk[c] += ds * sQ[ii * d + c];
      }
    }
  }
  if (!active) return;
  if (p.dk) {
    T* o = static_cast<T*>(p.dk) + (n * p.k_len + kj) * d;
#pragma unroll kUnroll
    for (int c = 0; c < MAXD; ++c)
      if (c < d) o[c] = dk[c] * T(p.scale);
  }
  if (p.dv_out) {
    T* o = static_cast<T*>(p.dv_out) + (n * p.k_len + kj) * dv;
#pragma unroll kUnroll
    for (int c = 0; c < MAXD; ++c)
      if (c < dv) o[c] = dvv[c];
  }
}

// dQ: one thread per query; the key side staged (K, V).
template <typename T, int MAXD>
__global__ void __launch_bounds__(kExactThreads) flash_bwd_q_exact_kernel(const FlashParams p) {
  constexpr int kUnroll = MAXD <= 64 ? MAXD : 8;  // see kExactUnrollNote
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
#pragma unroll kUnroll
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
#pragma unroll kUnroll
      for (int c = 0; c < MAXD; ++c) {
        if (c < d) dot += qr[c] * sK[jj * d + c];
        if (c < dv) dp += dor[c] * sV[jj * dv + c];
      }
      const T ds = exp(exact_score(p, mask, n, qi, j0 + jj, dot) - L) * (dp - Dl);
#pragma unroll kUnroll
      for (int c = 0; c < MAXD; ++c)
        if (c < d) dq[c] += ds * sK[jj * d + c];
    }
  }
  if (!active) return;
  T* o = static_cast<T*>(p.dq) + row * d;
#pragma unroll kUnroll
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
    flash_fwd_exact_kernel<T, MAXD><<<qgrid, kExactThreads, stage, compute_stream()>>>(p);
    check_last_launch("flash_fwd_exact_kernel");
    return;
  }
  const int64_t rows = p.n * p.q_len;
  flash_delta_kernel<T, T><<<unsigned((rows + 7) / 8), 256, 0, compute_stream()>>>(static_cast<const T*>(p.grad_out),
                                                              static_cast<const T*>(p.out), static_cast<T*>(p.delta),
                                                              rows, int(p.dv));
  check_last_launch("flash_delta_kernel");
  if (p.dk || p.dv_out) {
    const dim3 kgrid(unsigned((p.k_len + kExactThreads - 1) / kExactThreads), unsigned(p.n));
    flash_bwd_kv_exact_kernel<T, MAXD><<<kgrid, kExactThreads, size_t(kv_smem), compute_stream()>>>(p);
    check_last_launch("flash_bwd_kv_exact_kernel");
  }
  if (p.dq) {
    flash_bwd_q_exact_kernel<T, MAXD><<<qgrid, kExactThreads, stage, compute_stream()>>>(p);
    check_last_launch("flash_bwd_q_exact_kernel");
  }
}

}  // namespace

template <typename T>
void exact_dispatch_t(const FlashParams& p, bool backward) {
  const int64_t d = std::max(p.d, p.dv);
  if (d <= 64) return exact_run<T, 64>(p, backward);
  if (d <= 160) return exact_run<T, 160>(p, backward);
  return exact_run<T, 256>(p, backward);
}


void flash_exact(const FlashParams& p, bool backward) {
  if (p.dtype == DType::F32) return exact_dispatch_t<float>(p, backward);
  if (p.dtype == DType::F64) return exact_dispatch_t<double>(p, backward);
  LOOM_FAIL("flash_exact: dtype ", p.dtype, " is not f32 / f64");
}

}  // namespace loom::cuda
