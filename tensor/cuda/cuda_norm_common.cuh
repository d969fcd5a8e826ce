// Shared by the layer-norm and group-norm kernels (cuda_layer_norm.cu, cuda_group_norm.cu): the sum
// reducer, optional-parameter loads, the finishing pass of the parameter gradients' chunk sums, and
// the warp-or-block row launcher. Sums in float (double for f64), nothing uses atomics: runs are
// deterministic.
#pragma once

#include <cstdint>

#include "tensor/cuda/cuda_device.cuh"
#include "tensor/cuda/cuda_fused.h"

namespace loom::cuda {
namespace {

// Rows up to this many elements take a warp each; longer ones a block.
constexpr int64_t kWarpRowLimit = 1024;

template <typename Acc> using RSum = Reducer<ReduceOp::Sum, Acc>;

template <typename T>
__device__ __forceinline__ compute_t<T> load_or(const T* p, int64_t i, compute_t<T> fallback) {
  return p ? widen(p[i]) : fallback;
}

// dweight[j] = Σ_chunk partial[0][chunk][j], dbias likewise from partial[1].
template <typename T>
__global__ void param_grad_finish_kernel(const compute_t<T>* partial, int64_t chunks, int64_t n, T* dweight,
                                         T* dbias) {
  using Acc = compute_t<T>;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    Acc aw = Acc(0), ab = Acc(0);
    for (int64_t c = 0; c < chunks; ++c) {
      aw += partial[c * n + j];
      ab += partial[(chunks + c) * n + j];
    }
    if (dweight) dweight[j] = narrow<T>(aw);
    if (dbias) dbias[j] = narrow<T>(ab);
  }
}

// Launches one-row-group kernels with a warp per row for short rows, else a block.
template <typename Short, typename Long>
void launch_rows(int64_t rows, int64_t n, Short short_kernel, Long long_kernel, const char* name) {
  if (n <= kWarpRowLimit) {
    short_kernel(grid_for(rows, kThreads / 32));
  } else {
    long_kernel(grid_for(rows, 1));
  }
  check_last_launch(name);
}

}  // namespace
}  // namespace loom::cuda
