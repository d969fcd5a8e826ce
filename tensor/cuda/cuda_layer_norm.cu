// Layer norm kernels, forward and backward (params in cuda_fused.h): one group of threads per row
// (a warp for rows of at most kWarpRowLimit, else the block; for 16-byte packs the row in registers,
// and in bf16 / f16 rows that split into 8, 16 or 32 lanes of 4, 5 or 8 packs a group of lanes per
// row); two passes for mean and variance. Backward: dx per row as the forward; dweight / dbias as
// column sums per chunk of rows into `partial`, then summed over chunks in order.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "tensor/cuda/cuda_norm_common.cuh"

namespace loom::cuda {
namespace {

// ---- layer norm ----------------------------------------------------------------------

// One group of kGroup threads per row, over packs of V consecutive elements (V = 1, or a 16-byte
// pack when n is a multiple of it and x, y are aligned: the launcher's choice).
template <typename T, int kGroup, int V>
__global__ void layer_norm_kernel(LayerNormParams p) {
  using Acc = compute_t<T>;
  using P = PackN<T, V>;
  __shared__ Acc scratch[kGroup / 32];
  constexpr int kRowsPerBlock = kThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  const T* w = static_cast<const T*>(p.weight);
  const T* b = static_cast<const T*>(p.bias);
  Acc* mean_out = static_cast<Acc*>(p.mean);
  Acc* rstd_out = static_cast<Acc*>(p.rstd);
  const Acc inv_n = Acc(1) / Acc(p.n);
  const int64_t packs = p.n / V;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; row < p.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const P* x = reinterpret_cast<const P*>(static_cast<const T*>(p.x) + row * p.n);
    Acc s = Acc(0);
    for (int64_t j = lane; j < packs; j += kGroup) {
      const P v = x[j];
#pragma unroll
      for (int k = 0; k < V; ++k) s += widen(v.v[k]);
    }
    const Acc mean = group_reduce<kGroup, RSum<Acc>>(s, scratch) * inv_n;
    Acc var = Acc(0);
    for (int64_t j = lane; j < packs; j += kGroup) {
      const P v = x[j];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const Acc d = widen(v.v[k]) - mean;
        var += d * d;
      }
    }
    const Acc rstd = Acc(1) / m_sqrt(group_reduce<kGroup, RSum<Acc>>(var, scratch) * inv_n + Acc(p.eps));
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    P* y = reinterpret_cast<P*>(static_cast<T*>(p.y) + row * p.n);
    for (int64_t j = lane; j < packs; j += kGroup) {
      P v = x[j];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t c = j * V + k;
        v.v[k] = narrow<T>((widen(v.v[k]) - mean) * rstd * load_or(w, c, Acc(1)) + load_or(b, c, Acc(0)));
      }
      y[j] = v;
    }
  }
}

// (v − mean)·rstd·w[j] + b[j] for the 16-byte pack v at pack index j of a row (w, b null: 1, 0).
template <typename T, int N, typename Acc>
__device__ __forceinline__ PackN<T, N> normalized_pack(PackN<T, N> v, Acc mean, Acc rstd, const PackN<T, N>* w,
                                                       const PackN<T, N>* b, int j) {
  PackN<T, N> wj, bj;
  if (w) wj = w[j];
  if (b) bj = b[j];
#pragma unroll
  for (int k = 0; k < N; ++k)
    v.v[k] = narrow<T>((widen(v.v[k]) - mean) * rstd * (w ? widen(wj.v[k]) : Acc(1)) + (b ? widen(bj.v[k]) : Acc(0)));
  return v;
}

// The 16-byte-pack path for rows of at most 32·kPacks packs (n ≤ 2048 in bf16 / f16, 1024 in f32:
// every layer norm of Stable Diffusion's UNets): a warp per row holds the row in registers, so x
// is read from memory once and all of a lane's loads are in flight together (the loop above reads
// the row three times, one pack after another); w and b are read as packs. Sums in the same order
// as layer_norm_kernel<T, 32, V>, so the results are the same. kAdd: the row is x + residual,
// rounded to T (as the add kernel rounds it) and written to p.sum before it is normalised.
template <typename T, int kPacks, bool kAdd = false>
__global__ void layer_norm_cached_kernel(LayerNormParams p) {
  using Acc = compute_t<T>;
  using P = Pack16<T>;
  constexpr int V = P::kSize, kRowsPerBlock = kThreads / 32;
  const int lane = threadIdx.x % 32;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  Acc* mean_out = static_cast<Acc*>(p.mean);
  Acc* rstd_out = static_cast<Acc*>(p.rstd);
  const Acc inv_n = Acc(1) / Acc(p.n);
  const int packs = int(p.n / V);
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32; row < p.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const P* x = reinterpret_cast<const P*>(static_cast<const T*>(p.x) + row * p.n);
    P v[kPacks];
#pragma unroll
    for (int i = 0; i < kPacks; ++i)
      if (lane + 32 * i < packs) v[i] = x[lane + 32 * i];
    if constexpr (kAdd) {
      const P* r = reinterpret_cast<const P*>(static_cast<const T*>(p.residual) + row * p.n);
      P* sum = reinterpret_cast<P*>(static_cast<T*>(p.sum) + row * p.n);
#pragma unroll
      for (int i = 0; i < kPacks; ++i)
        if (lane + 32 * i < packs) {
          const P ri = r[lane + 32 * i];
#pragma unroll
          for (int k = 0; k < V; ++k) v[i].v[k] = narrow<T>(widen(v[i].v[k]) + widen(ri.v[k]));
          sum[lane + 32 * i] = v[i];
        }
    }
    Acc s = Acc(0);
#pragma unroll
    for (int i = 0; i < kPacks; ++i)
      if (lane + 32 * i < packs) {
#pragma unroll
        for (int k = 0; k < V; ++k) s += widen(v[i].v[k]);
      }
    const Acc mean = group_reduce<32, RSum<Acc>>(s, static_cast<Acc*>(nullptr)) * inv_n;
    Acc var = Acc(0);
#pragma unroll
    for (int i = 0; i < kPacks; ++i)
      if (lane + 32 * i < packs) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const Acc d = widen(v[i].v[k]) - mean;
          var += d * d;
        }
      }
    const Acc rstd = Acc(1) / m_sqrt(group_reduce<32, RSum<Acc>>(var, static_cast<Acc*>(nullptr)) * inv_n + Acc(p.eps));
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    P* y = reinterpret_cast<P*>(static_cast<T*>(p.y) + row * p.n);
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int j = lane + 32 * i;
      if (j < packs) y[j] = normalized_pack(v[i], mean, rstd, w, b, j);
    }
  }
}

// The norm of 2-byte rows that split exactly into kLanes lanes × kPacks 16-byte packs (kLanes 8,
// 16 or 32; Stable Diffusion's 320 / 640 / 1280 channels are 8 / 16 / 32 lanes of 5 packs): a
// group of kLanes lanes per row, 32 / kLanes rows per warp, every lane busy and no registers held
// for packs a row does not have. Against layer_norm_cached_kernel (a warp per row, room for 8 packs
// a lane) a warp keeps 2–4× the bytes in flight and more warps fit an SM. kAdd as there (the row is
// x + residual, rounded to T and written to p.sum). The same arithmetic per row; the sums differ
// from the other kernels' only in float rounding.
template <typename T, int kLanes, int kPacks, bool kAdd>
__global__ void layer_norm_groups_kernel(LayerNormParams p) {
  using Acc = compute_t<T>;
  using P = Pack16<T>;
  constexpr int V = P::kSize, kRowsPerWarp = 32 / kLanes, kWarps = kThreads / 32;
  static_assert(sizeof(T) == 2 && kLanes >= 8 && kLanes <= 32 && 32 % kLanes == 0, "2-byte rows, 8-32 lanes");
  const int lane = threadIdx.x % 32, sub = lane % kLanes;
  const P* w = static_cast<const P*>(p.weight);
  const P* b = static_cast<const P*>(p.bias);
  Acc* mean_out = static_cast<Acc*>(p.mean);
  Acc* rstd_out = static_cast<Acc*>(p.rstd);
  const Acc inv_n = Acc(1) / Acc(p.n);
  const int64_t warp0 = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, warp_stride = int64_t(gridDim.x) * kWarps;
  for (int64_t first = warp0 * kRowsPerWarp; first < p.rows; first += warp_stride * kRowsPerWarp) {
    const int64_t row = first + lane / kLanes;  // the loop test is the warp's: every lane shuffles
    const bool valid = row < p.rows;
    const P* x = reinterpret_cast<const P*>(static_cast<const T*>(p.x) + row * p.n);
    P v[kPacks];
    if (valid) {
#pragma unroll
      for (int i = 0; i < kPacks; ++i) v[i] = x[sub + kLanes * i];
      if constexpr (kAdd) {
        const P* r = reinterpret_cast<const P*>(static_cast<const T*>(p.residual) + row * p.n);
        P* sum = reinterpret_cast<P*>(static_cast<T*>(p.sum) + row * p.n);
        P ri[kPacks];
#pragma unroll
        for (int i = 0; i < kPacks; ++i) ri[i] = r[sub + kLanes * i];
#pragma unroll
        for (int i = 0; i < kPacks; ++i) {
#pragma unroll
          for (int k = 0; k < V; ++k) v[i].v[k] = narrow<T>(widen(v[i].v[k]) + widen(ri[i].v[k]));
          sum[sub + kLanes * i] = v[i];
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPacks; ++i)
#pragma unroll
        for (int k = 0; k < V; ++k) v[i].v[k] = T(0.0f);
    }
    Acc s = Acc(0);
#pragma unroll
    for (int i = 0; i < kPacks; ++i)
#pragma unroll
      for (int k = 0; k < V; ++k) s += widen(v[i].v[k]);
#pragma unroll
    for (int off = kLanes / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const Acc mean = s * inv_n;
    Acc var = Acc(0);
#pragma unroll
    for (int i = 0; i < kPacks; ++i)
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const Acc d = widen(v[i].v[k]) - mean;
        var += d * d;
      }
#pragma unroll
    for (int off = kLanes / 2; off > 0; off >>= 1) var += __shfl_xor_sync(0xffffffffu, var, off);
    const Acc rstd = Acc(1) / m_sqrt(var * inv_n + Acc(p.eps));
    if (!valid) continue;
    if (sub == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    P* y = reinterpret_cast<P*>(static_cast<T*>(p.y) + row * p.n);
#pragma unroll
    for (int i = 0; i < kPacks; ++i) y[sub + kLanes * i] = normalized_pack(v[i], mean, rstd, w, b, sub + kLanes * i);
  }
}

// Launches layer_norm_groups_kernel when a row of `packs` 16-byte packs is kLanes × kPacks for
// one of the instantiated shapes (5 packs a lane first: SD's widths); false otherwise.
template <typename T, bool kAdd>
bool launch_layer_norm_groups(const LayerNormParams& p, int64_t packs) {
  bool launched = false;
  auto try_shape = [&](auto lanes, auto per_lane) {
    constexpr int kLanes = decltype(lanes)::value, kPacks = decltype(per_lane)::value;
    if (launched || packs != int64_t(kLanes) * kPacks) return;
    constexpr int64_t kRowsPerBlock = (kThreads / 32) * (32 / kLanes);
    const unsigned grid = unsigned(std::min<int64_t>((p.rows + kRowsPerBlock - 1) / kRowsPerBlock, 65535));
    layer_norm_groups_kernel<T, kLanes, kPacks, kAdd><<<grid, kThreads, 0, compute_stream()>>>(p);
    check_last_launch(kAdd ? "layer_norm_kernel (row groups, + residual)" : "layer_norm_kernel (row groups)");
    launched = true;
  };
  using L8 = std::integral_constant<int, 8>;
  using L16 = std::integral_constant<int, 16>;
  using L32 = std::integral_constant<int, 32>;
  using P4 = std::integral_constant<int, 4>;
  using P5 = std::integral_constant<int, 5>;
  using P8 = std::integral_constant<int, 8>;
  try_shape(L8{}, P5{});  // 320
  try_shape(L16{}, P5{});  // 640
  try_shape(L32{}, P5{});  // 1280
  try_shape(L8{}, P4{});  // 256
  try_shape(L16{}, P4{});  // 512
  try_shape(L32{}, P4{});  // 1024
  try_shape(L32{}, P8{});  // 2048
  return launched;
}

// LOOM_LAYER_NORM_GROUPS=0: the warp-per-row kernels instead of the row-groups one.
bool layer_norm_groups_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("LOOM_LAYER_NORM_GROUPS");
    return !(env && std::string(env) == "0");
  }();
  return on;
}

// dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)),  ĝ = dy·w.
template <typename T, int kGroup>
__global__ void layer_norm_dx_kernel(LayerNormGradParams p) {
  using Acc = compute_t<T>;
  __shared__ Acc scratch[kGroup / 32];
  constexpr int kRowsPerBlock = kThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  const T* w = static_cast<const T*>(p.weight);
  const Acc* mean_in = static_cast<const Acc*>(p.mean);
  const Acc* rstd_in = static_cast<const Acc*>(p.rstd);
  const Acc inv_n = Acc(1) / Acc(p.n);
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; row < p.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const T* x = static_cast<const T*>(p.x) + row * p.n;
    const T* dy = static_cast<const T*>(p.dy) + row * p.n;
    T* dx = static_cast<T*>(p.dx) + row * p.n;
    const Acc mean = mean_in[row], rstd = rstd_in[row];
    Acc sg = Acc(0), sgx = Acc(0);
    for (int64_t j = lane; j < p.n; j += kGroup) {
      const Acc g = widen(dy[j]) * load_or(w, j, Acc(1));
      sg += g;
      sgx += g * ((widen(x[j]) - mean) * rstd);
    }
    const Acc mg = group_reduce<kGroup, RSum<Acc>>(sg, scratch) * inv_n;
    const Acc mgx = group_reduce<kGroup, RSum<Acc>>(sgx, scratch) * inv_n;
    for (int64_t j = lane; j < p.n; j += kGroup) {
      const Acc g = widen(dy[j]) * load_or(w, j, Acc(1));
      const Acc xh = (widen(x[j]) - mean) * rstd;
      dx[j] = narrow<T>(rstd * (g - mg - xh * mgx));
    }
  }
}

// Block (32, 8) per (column tile, row chunk): partial[0][chunk][j] = Σ dy·x̂,
// partial[1][chunk][j] = Σ dy over the chunk's rows.
constexpr int kColsX = 32, kColsY = 8;
template <typename T>
__global__ void layer_norm_param_partial_kernel(LayerNormGradParams p) {
  using Acc = compute_t<T>;
  __shared__ Acc sw[kColsY][kColsX + 1], sb[kColsY][kColsX + 1];
  const Acc* mean_in = static_cast<const Acc*>(p.mean);
  const Acc* rstd_in = static_cast<const Acc*>(p.rstd);
  Acc* partial = static_cast<Acc*>(p.partial);
  for (int64_t chunk = blockIdx.y; chunk < p.row_chunks; chunk += gridDim.y) {
    for (int64_t j0 = int64_t(blockIdx.x) * kColsX; j0 < p.n; j0 += int64_t(gridDim.x) * kColsX) {
      const int64_t j = j0 + threadIdx.x;
      Acc aw = Acc(0), ab = Acc(0);
      if (j < p.n) {
        const int64_t r_end = (chunk + 1) * p.rows_per_chunk < p.rows ? (chunk + 1) * p.rows_per_chunk : p.rows;
        for (int64_t r = chunk * p.rows_per_chunk + threadIdx.y; r < r_end; r += kColsY) {
          const Acc g = widen(static_cast<const T*>(p.dy)[r * p.n + j]);
          const Acc xh = (widen(static_cast<const T*>(p.x)[r * p.n + j]) - mean_in[r]) * rstd_in[r];
          aw += g * xh;
          ab += g;
        }
      }
      sw[threadIdx.y][threadIdx.x] = aw;
      sb[threadIdx.y][threadIdx.x] = ab;
      __syncthreads();
      if (threadIdx.y == 0 && j < p.n) {
#pragma unroll
        for (int y = 1; y < kColsY; ++y) {
          aw += sw[y][threadIdx.x];
          ab += sb[y][threadIdx.x];
        }
        partial[chunk * p.n + j] = aw;
        partial[(p.row_chunks + chunk) * p.n + j] = ab;
      }
      __syncthreads();
    }
  }
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------

void launch_layer_norm(const LayerNormParams& p) {
  if (p.rows == 0 || p.n == 0) return;
  dispatch_float(p.dtype, "cuda layer_norm", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Pack16<T>::kSize;
    constexpr int kPacks = 8;
    const bool params_aligned = (!p.weight || aligned16(p.weight)) && (!p.bias || aligned16(p.bias));
    const bool cached = p.n % V == 0 && p.n <= 32 * kPacks * V && params_aligned && aligned16(p.x) && aligned16(p.y);
    if (p.residual) {
      const bool one_pass = cached && aligned16(p.residual) && aligned16(p.sum);  // add and norm together
      if constexpr (sizeof(T) == 2) {
        if (one_pass && layer_norm_groups_enabled() && launch_layer_norm_groups<T, true>(p, p.n / V)) return;
      }
      if (one_pass) {
        layer_norm_cached_kernel<T, kPacks, true>
            <<<grid_for(p.rows, kThreads / 32), kThreads, 0, compute_stream()>>>(p);
        check_last_launch("layer_norm_kernel (row in registers, + residual)");
        return;
      }
      BinaryParams add;  // sum = x + residual, then the norm of sum
      add.op = BinaryOp::Add, add.dtype = p.dtype, add.out = p.sum, add.a = p.x, add.b = p.residual;
      add.numel = p.rows * p.n, add.ndim = 1, add.shape[0] = add.numel, add.a_strides[0] = add.b_strides[0] = 1;
      launch_binary(add);
      LayerNormParams q = p;
      q.x = p.sum, q.residual = nullptr, q.sum = nullptr;
      launch_layer_norm(q);
      return;
    }
    if (p.n % V == 0 && aligned16(p.x) && aligned16(p.y)) {  // 16-byte packs (rows start on one)
      if constexpr (sizeof(T) == 2) {
        if (layer_norm_groups_enabled() && params_aligned && launch_layer_norm_groups<T, false>(p, p.n / V)) return;
      }
      if (cached) {  // the row in registers
        layer_norm_cached_kernel<T, kPacks><<<grid_for(p.rows, kThreads / 32), kThreads, 0, compute_stream()>>>(p);
        check_last_launch("layer_norm_kernel (row in registers)");
        return;
      }
      launch_rows(
          p.rows, p.n, [&](unsigned grid) { layer_norm_kernel<T, 32, V><<<grid, kThreads, 0, compute_stream()>>>(p); },
          [&](unsigned grid) { layer_norm_kernel<T, kThreads, V><<<grid, kThreads, 0, compute_stream()>>>(p); },
          "layer_norm_kernel");
      return;
    }
    launch_rows(
        p.rows, p.n, [&](unsigned grid) { layer_norm_kernel<T, 32, 1><<<grid, kThreads, 0, compute_stream()>>>(p); },
        [&](unsigned grid) { layer_norm_kernel<T, kThreads, 1><<<grid, kThreads, 0, compute_stream()>>>(p); },
        "layer_norm_kernel");
  });
}

void launch_layer_norm_backward(const LayerNormGradParams& p) {
  if (p.rows == 0 || p.n == 0) return;
  dispatch_float(p.dtype, "cuda layer_norm_backward", [&](auto tag) {
    using T = decltype(tag);
    using Acc = compute_t<T>;
    if (p.dx) {
      launch_rows(
          p.rows, p.n, [&](unsigned grid) { layer_norm_dx_kernel<T, 32><<<grid, kThreads, 0, compute_stream()>>>(p); },
          [&](unsigned grid) { layer_norm_dx_kernel<T, kThreads><<<grid, kThreads, 0, compute_stream()>>>(p); }, "layer_norm_dx_kernel");
    }
    if (p.dweight || p.dbias) {
      const dim3 grid(grid_for(p.n, kColsX), unsigned(std::min<int64_t>(p.row_chunks, 65535)));
      layer_norm_param_partial_kernel<T><<<grid, dim3(kColsX, kColsY), 0, compute_stream()>>>(p);
      check_last_launch("layer_norm_param_partial_kernel");
      param_grad_finish_kernel<T><<<grid_for(p.n), kThreads, 0, compute_stream()>>>(static_cast<const Acc*>(p.partial), p.row_chunks,
                                                               p.n, static_cast<T*>(p.dweight),
                                                               static_cast<T*>(p.dbias));
      check_last_launch("param_grad_finish_kernel");
    }
  });
}

}  // namespace loom::cuda
