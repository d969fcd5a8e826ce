// The tensor-core backward's dQ as a kernel of its own (bf16 / f16), the alternative to the f32
// atomics of cuda_flash_bwd.cu (LOOM_FLASH_BWD_DQ=separate; docs/flash-notes.md). Query-stationary,
// like the forward: a block owns 16·4 queries of one problem row and loops over 64-key tiles
// (K, V cp.async double-buffered), recomputing per tile
//   S = Q·Kᵀ, P = exp2(S·scale·log2 e − L·log2 e), dP = dO·Vᵀ, dS = P∘(dP − D), dQ += dS·K
// with P, dS going from accumulators to the next product in registers (the forward's P·V trick),
// then writes dQ = scale·acc once, in the params' layout: no atomics, no f32 buffer. Costs three
// GEMMs per tile (S, dP, dQ) on top of the main kernel's four (Sᵀ, dV, dPᵀ, dK).
// Needs p.delta (D = rowsum(dO∘O)) and p.lse; writes p.dq.
#include <cstdlib>
#include <string>

#include "tensor/cuda/cuda_flash_tc.cuh"
#include "tensor/determinism.h"

namespace loom::cuda {

namespace {

// Q's and dO's A fragments stay in registers up to d = 80; above they are re-read per key tile.
template <int D>
constexpr bool kDqFragsInRegs = D <= 80;

template <typename T, int D>
__global__ void __launch_bounds__(TcShape<D>::kThreads) flash_dq_tc_kernel(const FlashParams p) {
  using S = TcShape<D>;
  constexpr int kDp = S::kDp, kLd = S::kLd, kCols = S::kCols, kRows = S::kRows;
  constexpr bool kInRegs = kDqFragsInRegs<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [kRows][kLd]
  T* sdO = sQ + kRows * kLd;               // [kRows][kLd]
  T* sK0 = sdO + kRows * kLd;              // K and V, two buffers each: [buf][kCols][kLd]
  T* sV0 = sK0 + 2 * kCols * kLd;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t n = blockIdx.y, i0 = int64_t(blockIdx.x) * kRows;
  const FlashRows qr = flash_rows(p, n, p.q_len, D), kr = flash_rows(p, n, p.k_len, D);
  const T* q = static_cast<const T*>(p.q) + qr.base;
  const T* dout = static_cast<const T*>(p.grad_out) + qr.base;
  const T* k = static_cast<const T*>(p.k) + kr.base;
  const T* v = static_cast<const T*>(p.v) + kr.base;
  const T* mask = static_cast<const T*>(p.mask);
  const float sl2 = float(p.scale) * kLog2e;

  int64_t tiles = (p.k_len + kCols - 1) / kCols;
  if (p.causal) tiles = min(tiles, (i0 + kRows - 1) / kCols + 1);

  load_tile_async<T, kDp>(sQ, kLd, q, i0, kRows, p.q_len, D, qr.stride, tid, S::kThreads);
  load_tile_async<T, kDp>(sdO, kLd, dout, i0, kRows, p.q_len, D, qr.stride, tid, S::kThreads);
  if (tiles > 0) {
    load_tile_async<T, kDp>(sK0, kLd, k, 0, kCols, p.k_len, D, kr.stride, tid, S::kThreads);
    load_tile_async<T, kDp>(sV0, kLd, v, 0, kCols, p.k_len, D, kr.stride, tid, S::kThreads);
  }
  cp_async_commit();

  // rows g (h = 0) and g + 8 (h = 1) of this warp's 16: their lse (log2 domain) and D
  const int r0 = warp * 16;
  int64_t row_q[2];
  float l2[2], dd[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_q[h] = i0 + r0 + g + 8 * h;
    const bool in = row_q[h] < p.q_len;
    l2[h] = in ? static_cast<const float*>(p.lse)[n * p.q_len + row_q[h]] * kLog2e : 0.f;
    dd[h] = in ? static_cast<const float*>(p.delta)[n * p.q_len + row_q[h]] : 0.f;
  }
  cp_async_wait_all();
  __syncthreads();
  uint32_t qf[kInRegs ? kDp / 16 : 1][4], df[kInRegs ? kDp / 16 : 1][4];
  if constexpr (kInRegs) {
#pragma unroll
    for (int kk = 0; kk < kDp / 16; ++kk) {
      ldsm_a(qf[kk], sQ, r0, kk * 16, kLd, lane);
      ldsm_a(df[kk], sdO, r0, kk * 16, kLd, lane);
    }
  }

  float acc[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  // x = A·Bᵀ over the head dim for this warp's 16 rows × the tile's 64 keys: A's fragments from
  // registers (af) or shared memory (a_tile), B = K or V rows [kCols][kLd].
  auto rows_times_keys = [&](float (*x)[4], const uint32_t (*af)[4], const T* a_tile, const T* b_tile) {
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) x[j][0] = x[j][1] = x[j][2] = x[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kDp / 16; ++kk) {
      uint32_t a[4];
      if constexpr (kInRegs) {
#pragma unroll
        for (int r = 0; r < 4; ++r) a[r] = af[kk][r];
      } else {
        ldsm_a(a, a_tile, r0, kk * 16, kLd, lane);
      }
#pragma unroll
      for (int j = 0; j < kCols / 8; j += 2) {
        uint32_t b[4];
        ldsm_b_pair(b, b_tile, j * 8, kk * 16, kLd, lane);
        mma16816(x[j], a, b, T());
        mma16816(x[j + 1], a, b + 2, T());
      }
    }
  };

  for (int64_t it = 0; it < tiles; ++it) {
    const int64_t j0 = it * kCols;
    const int buf = int(it & 1);
    const T* sK = sK0 + buf * kCols * kLd;
    const T* sV = sV0 + buf * kCols * kLd;
    if (it > 0) {
      cp_async_wait_all();
      __syncthreads();  // tile it landed; every warp is done with tile it − 1
    }
    if (it + 1 < tiles) {
      load_tile_async<T, kDp>(sK0 + (buf ^ 1) * kCols * kLd, kLd, k, j0 + kCols, kCols, p.k_len, D, kr.stride, tid,
                              S::kThreads);
      load_tile_async<T, kDp>(sV0 + (buf ^ 1) * kCols * kLd, kLd, v, j0 + kCols, kCols, p.k_len, D, kr.stride, tid,
                              S::kThreads);
    }
    cp_async_commit();

    float s[kCols / 8][4];
    rows_times_keys(s, qf, sQ, sK);  // S = Q·Kᵀ
    // P = exp2(s2 − L2); bounds, causal and mask only on the last / diagonal tiles or with a mask
    const bool plain = !mask && j0 + kCols <= p.k_len && (!p.causal || j0 + kCols - 1 <= i0);
    if (plain) {
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = fast_exp2(fmaf(s[j][e], sl2, -l2[e / 2]));
    } else {
#pragma unroll
      for (int j = 0; j < kCols / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t kj = j0 + j * 8 + 2 * t + (e & 1), qi = row_q[e / 2];
          float x = s[j][e] * sl2;
          if (kj >= p.k_len || (p.causal && kj > qi)) x = -INFINITY;
          else if (mask && qi < p.q_len) x += mask_log2(p, mask, n, qi, kj);
          s[j][e] = fast_exp2(x - l2[e / 2]);
        }
      }
    }
    float dp[kCols / 8][4];
    rows_times_keys(dp, df, sdO, sV);  // dP = dO·Vᵀ
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= dp[j][e] - dd[e / 2];  // dS = P∘(dP − D)
    // dQ += dS·K, dS straight from the accumulators
#pragma unroll
    for (int kk = 0; kk < kCols / 16; ++kk) {
      uint32_t a[4];
      a[0] = Half2<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = Half2<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = Half2<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = Half2<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
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
  }
  cp_async_wait_all();  // a block with no key tile (causal) may still have copies in flight

  T* dq = static_cast<T*>(p.dq) + qr.base;
  const float scale = float(p.scale);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t qi = row_q[h];
    if (qi >= p.q_len) continue;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const uint32_t packed = Half2<T>::pack(acc[j][2 * h] * scale, acc[j][2 * h + 1] * scale);
      *reinterpret_cast<uint32_t*>(dq + qi * qr.stride + j * 8 + 2 * t) = packed;
    }
  }
}

template <typename T, int D>
void tc_dq(const FlashParams& p) {
  using S = TcShape<D>;
  const size_t smem = size_t(2 * S::kRows + 4 * S::kCols) * S::kLd * sizeof(T);
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(flash_dq_tc_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(unsigned((p.q_len + S::kRows - 1) / S::kRows), unsigned(p.n));
  flash_dq_tc_kernel<T, D><<<grid, S::kThreads, smem, compute_stream()>>>(p);
  check_last_launch("flash_dq_tc_kernel");
}

template <typename T>
void flash_tc_dq_for(const FlashParams& p) {
  dispatch_head_dim(p.d, "", [&](auto dim) { tc_dq<T, decltype(dim)::value>(p); });
}

}  // namespace

bool flash_dq_separate() {
  if (deterministic_algorithms()) return true;  // no f32 atomics (tensor/determinism.h)
  const char* v = std::getenv("LOOM_FLASH_BWD_DQ");
  if (!v || std::string(v) == "atomic") return false;
  LOOM_CHECK(std::string(v) == "separate", "LOOM_FLASH_BWD_DQ=", v, ": expected atomic or separate");
  return true;
}

void flash_tc_dq_separate(const FlashParams& p) {
  if (p.dtype == DType::BF16) return flash_tc_dq_for<__nv_bfloat16>(p);
  if (p.dtype == DType::F16) return flash_tc_dq_for<__half>(p);
  LOOM_FAIL("flash_tc_dq_separate: dtype ", p.dtype, " is not bf16 / f16");
}

}  // namespace loom::cuda
