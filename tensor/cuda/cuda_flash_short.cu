// Flash attention forward for a few keys (bf16 / f16): k_len ≤ kShortKeys, no mask, not causal —
// the cross-attention of Stable Diffusion's UNet, whose keys are CLIP's 77 tokens.
//
// The general mma.sync forward (cuda_flash_fwd.cu) runs its large unrolled code once per block on
// two 64-key tiles (the second mostly padding) and was measured bound by instruction fetch there
// (docs/flash-notes.md: "no instruction" stalls; 93 µs for the SDXL 32×32 cross-attention on
// 8 × 20 heads, where reading Q and writing O takes ~12 µs at the H200's bandwidth). Here:
//   - all keys are one tile of kShortKeys rows (zero past k_len), loaded once per problem row;
//   - one wave of blocks, each looping over an equal share of the query tiles (Q double-buffered
//     by cp.async), so its code is fetched once and run several times;
//   - the softmax is exact per tile (every key is in the tile): no running maximum, no rescale.
// Layouts, fragments and scores in the log2 domain as in cuda_flash_fwd.cu: s2 = q·k·scale·log2(e),
// P = exp2(s2 − m2), lse = (m2 + log2 l)·ln 2.
#include <algorithm>
#include <cstdlib>
#include <string>

#include "tensor/cuda/cuda_flash_tc.cuh"

namespace loom::cuda {

namespace {

template <int D>
struct ShortShape {
  static constexpr int kDp = TcShape<D>::kDp, kLd = TcShape<D>::kLd;
  static constexpr int kWarps = 4, kThreads = 32 * kWarps;
  static constexpr int kAtoms = D <= 80 ? 2 : 1;  // 16-row slices per warp (registers above)
  static constexpr int kRows = kWarps * 16 * kAtoms;
  static constexpr int kKeys = kShortKeys;
  static_assert(kKeys % 16 == 0, "P·V runs over the keys in k-steps of 16");
};

template <int D>
size_t short_smem() {
  using S = ShortShape<D>;
  return size_t(4 * S::kKeys + 2 * S::kRows) * S::kLd * 2;  // K, V and Q, each double-buffered
}

// Grid: one wave of resident blocks. The work is the list of (problem row n, query tile) pairs, n
// major; block b runs the contiguous range [b·total / grid, (b + 1)·total / grid) of it, so every
// block has the same number of tiles ± 1 (a wave quantised per row of problems left SDXL's 1280
// tiles on 1.2 waves of 264 blocks: the time of two). K and V are loaded when n changes, into the
// other of their two buffers while the current tile still reads the first; the next tile's Q is
// loaded while this one is computed.
template <typename T, int D>
__global__ void __launch_bounds__(ShortShape<D>::kThreads) flash_fwd_short_kernel(const FlashParams p) {
  using S = ShortShape<D>;
  constexpr int kDp = S::kDp, kLd = S::kLd, kAtoms = S::kAtoms, kRows = S::kRows, kKeys = S::kKeys;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK0 = reinterpret_cast<T*>(smem_raw);  // [2][kKeys][kLd]
  T* sV0 = sK0 + 2 * kKeys * kLd;           // [2][kKeys][kLd]
  T* sQ0 = sV0 + 2 * kKeys * kLd;           // [2][kRows][kLd]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t q_tiles = (p.q_len + kRows - 1) / kRows, total = q_tiles * p.n;
  const int64_t first = int64_t(blockIdx.x) * total / gridDim.x;
  const int64_t last = int64_t(blockIdx.x + 1) * total / gridDim.x;
  if (first >= last) return;
  const float sl2 = float(p.scale) * kLog2e;
  const int k_len = int(p.k_len);

  // K and V of row n into buffer kv; Q tile `qt` of row n into buffer qb (cp.async, not committed)
  auto load_kv = [&](int64_t n, int kv) {
    const FlashRows kr = flash_rows(p, n, p.k_len, D);
    load_tile_async<T, kDp>(sK0 + kv * kKeys * kLd, kLd, static_cast<const T*>(p.k) + kr.base, 0, kKeys, p.k_len, D,
                            kr.stride, tid, S::kThreads);
    load_tile_async<T, kDp>(sV0 + kv * kKeys * kLd, kLd, static_cast<const T*>(p.v) + kr.base, 0, kKeys, p.k_len, D,
                            kr.stride, tid, S::kThreads);
  };
  auto load_q = [&](int64_t n, int64_t qt, int qb) {
    const FlashRows qr = flash_rows(p, n, p.q_len, D);
    load_tile_async<T, kDp>(sQ0 + qb * kRows * kLd, kLd, static_cast<const T*>(p.q) + qr.base, qt * kRows, kRows,
                            p.q_len, D, qr.stride, tid, S::kThreads);
  };
  load_kv(first / q_tiles, 0);
  load_q(first / q_tiles, first % q_tiles, 0);
  cp_async_commit();

  int kv = 0;
  for (int64_t f = first; f < last; ++f) {
    const int64_t n = f / q_tiles, qt = f - n * q_tiles;
    const int qb = int((f - first) & 1);
    const T* sQ = sQ0 + qb * kRows * kLd;
    const T* sK = sK0 + kv * kKeys * kLd;
    const T* sV = sV0 + kv * kKeys * kLd;
    cp_async_wait_all();
    __syncthreads();  // this tile's Q, K, V landed; every warp is done with the previous tile
    const bool next_row = f + 1 < last && qt + 1 == q_tiles;  // the next tile is of row n + 1
    if (f + 1 < last) {
      if (next_row) load_kv(n + 1, kv ^ 1);
      load_q(next_row ? n + 1 : n, next_row ? 0 : qt + 1, qb ^ 1);
    }
    cp_async_commit();

    // S = Q·Kᵀ over all keys: slice a of this warp is rows (warp·kAtoms + a)·16 …
    float s[kAtoms][kKeys / 8][4];
#pragma unroll
    for (int a = 0; a < kAtoms; ++a)
#pragma unroll
      for (int j = 0; j < kKeys / 8; ++j) s[a][j][0] = s[a][j][1] = s[a][j][2] = s[a][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kDp / 16; ++kk) {
      uint32_t qa[kAtoms][4];
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) ldsm_a(qa[a], sQ, (warp * kAtoms + a) * 16, kk * 16, kLd, lane);
#pragma unroll
      for (int j = 0; j < kKeys / 8; j += 2) {
        uint32_t b[4];
        ldsm_b_pair(b, sK, j * 8, kk * 16, kLd, lane);
#pragma unroll
        for (int a = 0; a < kAtoms; ++a) {
          mma16816(s[a][j], qa[a], b, T());
          mma16816(s[a][j + 1], qa[a], b + 2, T());
        }
      }
    }

    // the exact softmax of rows g (h = 0) and g + 8 (h = 1) of each slice; keys ≥ k_len are −inf
    float m[kAtoms][2], l[kAtoms][2];
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = j * 8 + 2 * t + e;
            const float x = col < k_len ? s[a][j][2 * h + e] * sl2 : -INFINITY;
            s[a][j][2 * h + e] = x;
            mx = fmaxf(mx, x);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));  // finite: k_len ≥ 1
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kKeys / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = fast_exp2(s[a][j][2 * h + e] - mx);
            s[a][j][2 * h + e] = pe;
            sum += pe;
          }
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        m[a][h] = mx, l[a][h] = sum;
      }
    }

    // O = P·V, P straight from the accumulators
    float o[kAtoms][D / 8][4];
#pragma unroll
    for (int a = 0; a < kAtoms; ++a)
#pragma unroll
      for (int j = 0; j < D / 8; ++j) o[a][j][0] = o[a][j][1] = o[a][j][2] = o[a][j][3] = 0.f;
    accumulate_pv<T, D, kAtoms, kKeys>(o, s, sV, kLd, lane);

    const FlashRows qr = flash_rows(p, n, p.q_len, D);
    T* out = static_cast<T*>(p.out) + qr.base;
    float* lse = static_cast<float*>(p.lse) + n * p.q_len;
    const int64_t i0 = qt * kRows;
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t qi = i0 + (warp * kAtoms + a) * 16 + g + 8 * h;
        if (qi >= p.q_len) continue;
        store_output_row<T, D>(out + qi * qr.stride, lse + qi, o[a], h, m[a][h], l[a][h], t);
      }
    }
    if (next_row) kv ^= 1;
  }
}

template <typename T, int D>
void short_forward(const FlashParams& p) {
  using S = ShortShape<D>;
  const size_t smem = short_smem<D>();
  LOOM_CUDA_CHECK(
      cudaFuncSetAttribute(flash_fwd_short_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  // the blocks an SM holds, asked once per instantiation (as flash_sm_count: the first device's)
  static const int per_sm = [smem] {
    int blocks = 0;
    LOOM_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, flash_fwd_short_kernel<T, D>, S::kThreads, smem));
    return std::max(blocks, 1);
  }();
  // one wave of resident blocks, none without a tile
  const int64_t total = (p.q_len + S::kRows - 1) / S::kRows * p.n;
  const int64_t resident = int64_t(flash_sm_count()) * per_sm;
  const unsigned grid = unsigned(std::min(total, resident));
  flash_fwd_short_kernel<T, D><<<grid, S::kThreads, smem, compute_stream()>>>(p);
  check_last_launch("flash_fwd_short_kernel");
}

template <typename T>
void short_forward_for(const FlashParams& p) {
  dispatch_head_dim(p.d, "", [&](auto dim) { short_forward<T, decltype(dim)::value>(p); });
}

}  // namespace

bool flash_short_forward_chosen(const FlashParams& p) {
  const char* env = std::getenv("LOOM_FLASH_FWD_SHORT");
  const std::string choice = env ? env : "";
  LOOM_CHECK(choice.empty() || choice == "0" || choice == "1", "LOOM_FLASH_FWD_SHORT='", choice, "' is not 0 or 1");
  if (choice == "0") return false;
  const char* misfit = p.dtype != DType::BF16 && p.dtype != DType::F16 ? "its dtype is not bf16 / f16"
                       : p.mask != nullptr                            ? "it has a mask"
                       : p.causal                                     ? "it is causal"
                       : p.k_len < 1 || p.k_len > kShortKeys          ? "its key count is not 1 … kShortKeys (80)"
                                                                      : nullptr;
  LOOM_CHECK(choice.empty() || misfit == nullptr, "LOOM_FLASH_FWD_SHORT=1: this attention call (", p.k_len,
             " keys) does not fit the short-key forward: ", misfit);
  return misfit == nullptr;
}

void flash_short_forward(const FlashParams& p) {
  if (p.dtype == DType::BF16) return short_forward_for<__nv_bfloat16>(p);
  if (p.dtype == DType::F16) return short_forward_for<__half>(p);
  LOOM_FAIL("flash_short_forward: dtype ", p.dtype, " is not bf16 / f16");
}

}  // namespace loom::cuda
