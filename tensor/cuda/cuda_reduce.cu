// Kernels and launchers for the CUDA backend's reductions (sum, max over one dim) and softmax
// (forward, log-softmax, backward). Conventions as cuda_kernels.cu: plain parameter structs
// (cuda_common.h), device types and the op as template arguments, launches on the current
// device's compute stream without synchronizing. Reductions and softmax statistics accumulate in
// float (double for f64).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_device.cuh"

namespace loom::cuda {
namespace {

// ---- reductions ----------------------------------------------------------------------

// inner == 1: out[r] = reduce(in[r, 0..n)), one group of kGroup threads per row.
template <typename T, ReduceOp op, int kGroup>
__global__ void reduce_rows_kernel(ReduceParams p) {
  using Acc = compute_t<T>;
  using R = Reducer<op, Acc>;
  __shared__ Acc scratch[kThreads / 32];
  constexpr int kRowsPerBlock = kThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);
  // The row loop is uniform across a group (and across the block when kGroup == kThreads).
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; row < p.outer;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const T* x = in + row * p.n;
    Acc acc = R::identity();
    for (int64_t j = lane; j < p.n; j += kGroup) acc = R::combine(acc, widen(x[j]));
    acc = group_reduce<kGroup, R>(acc, scratch);
    if (lane == 0) out[row] = narrow<T>(acc);
  }
}

// inner > 1: out[o, i] = reduce_j in[o, j, i]. Block (32, 8): threadIdx.x runs along
// the contiguous inner dim (coalesced loads), threadIdx.y splits n eight ways, and
// the eight partial results are combined through shared memory.
constexpr int kColsX = 32, kColsY = 8;
template <typename T, ReduceOp op>
__global__ void reduce_cols_kernel(ReduceParams p) {
  using Acc = compute_t<T>;
  using R = Reducer<op, Acc>;
  __shared__ Acc partial[kColsY][kColsX + 1];
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);
  // Both loops are uniform across the block (they depend on blockIdx only).
  for (int64_t o = blockIdx.y; o < p.outer; o += gridDim.y) {
    for (int64_t i0 = int64_t(blockIdx.x) * kColsX; i0 < p.inner; i0 += int64_t(gridDim.x) * kColsX) {
      const int64_t i = i0 + threadIdx.x;
      Acc acc = R::identity();
      if (i < p.inner) {
        const T* x = in + o * p.n * p.inner + i;
        for (int64_t j = threadIdx.y; j < p.n; j += kColsY) acc = R::combine(acc, widen(x[j * p.inner]));
      }
      partial[threadIdx.y][threadIdx.x] = acc;
      __syncthreads();
      if (threadIdx.y == 0 && i < p.inner) {
#pragma unroll
        for (int y = 1; y < kColsY; ++y) acc = R::combine(acc, partial[y][threadIdx.x]);
        out[o * p.inner + i] = narrow<T>(acc);
      }
      __syncthreads();
    }
  }
}

// ---- softmax -------------------------------------------------------------------------

// Along rows of contiguous [rows, n], one group of kGroup threads per row:
//   m = max_j x_j, s = Σ_j exp(x_j − m); out = exp(x − m) / s  or  (x − m) − log(s).
template <typename T, int kGroup, bool kLog>
__global__ void softmax_kernel(SoftmaxParams p) {
  using Acc = compute_t<T>;
  using RMax = Reducer<ReduceOp::Max, Acc>;
  using RSum = Reducer<ReduceOp::Sum, Acc>;
  __shared__ Acc scratch[kThreads / 32];
  constexpr int kRowsPerBlock = kThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; row < p.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const T* x = in + row * p.n;
    T* y = out + row * p.n;
    Acc m = RMax::identity();
    for (int64_t j = lane; j < p.n; j += kGroup) m = RMax::combine(m, widen(x[j]));
    m = group_reduce<kGroup, RMax>(m, scratch);
    Acc s = Acc(0);
    for (int64_t j = lane; j < p.n; j += kGroup) s += m_exp(widen(x[j]) - m);
    s = group_reduce<kGroup, RSum>(s, scratch);
    if constexpr (kLog) {
      const Acc log_s = m_log(s);  // (x − m) − log s keeps precision when |m| is large
      for (int64_t j = lane; j < p.n; j += kGroup) y[j] = narrow<T>((widen(x[j]) - m) - log_s);
    } else {
      const Acc inv = Acc(1) / s;
      for (int64_t j = lane; j < p.n; j += kGroup) y[j] = narrow<T>(m_exp(widen(x[j]) - m) * inv);
    }
  }
}

// Along rows of contiguous [rows, n], one group of kGroup threads per row: s = Σ_j dy_j·y_j, then
// dx = y∘(dy − s) (each element read before it is written: dx may alias dy).
template <typename T, int kGroup>
__global__ void softmax_backward_kernel(SoftmaxGradParams p) {
  using Acc = compute_t<T>;
  using RSum = Reducer<ReduceOp::Sum, Acc>;
  __shared__ Acc scratch[kThreads / 32];
  constexpr int kRowsPerBlock = kThreads / kGroup;
  const int lane = threadIdx.x % kGroup;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; row < p.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const T* y = static_cast<const T*>(p.y) + row * p.n;
    const T* dy = static_cast<const T*>(p.dy) + row * p.n;
    T* dx = static_cast<T*>(p.dx) + row * p.n;
    Acc s = Acc(0);
    for (int64_t j = lane; j < p.n; j += kGroup) s += widen(dy[j]) * widen(y[j]);
    s = group_reduce<kGroup, RSum>(s, scratch);
    for (int64_t j = lane; j < p.n; j += kGroup) dx[j] = narrow<T>(widen(y[j]) * (widen(dy[j]) - s));
  }
}

// Rows of at most this length get one warp each; longer rows get a whole block.
constexpr int64_t kWarpRowLimit = 1024;

unsigned row_grid(int64_t rows, int group) { return grid_for(rows, kThreads / group); }

}  // namespace

// ---- launchers -------------------------------------------------------------------------

void launch_reduce(const ReduceParams& p) {
  if (p.outer == 0 || p.inner == 0) return;
  dispatch_float(p.dtype, "cuda reduce", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto op_tag) {
      constexpr ReduceOp op = decltype(op_tag)::value;
      if (p.inner == 1) {
        if (p.n <= kWarpRowLimit) {
          reduce_rows_kernel<T, op, 32><<<row_grid(p.outer, 32), kThreads, 0, compute_stream()>>>(p);
        } else {
          reduce_rows_kernel<T, op, kThreads><<<row_grid(p.outer, kThreads), kThreads, 0, compute_stream()>>>(p);
        }
        check_last_launch("reduce_rows_kernel");
      } else {
        const dim3 block(kColsX, kColsY);
        const dim3 grid(grid_for(p.inner, kColsX), grid_for(p.outer, 1));
        reduce_cols_kernel<T, op><<<grid, block, 0, compute_stream()>>>(p);
        check_last_launch("reduce_cols_kernel");
      }
    };
    switch (p.op) {
      case ReduceOp::Sum: run(std::integral_constant<ReduceOp, ReduceOp::Sum>{}); return;
      case ReduceOp::Max: run(std::integral_constant<ReduceOp, ReduceOp::Max>{}); return;
    }
    LOOM_FAIL("cuda reduce: unknown ReduceOp ", int(p.op));
  });
}

void launch_softmax(const SoftmaxParams& p) {
  if (p.rows == 0 || p.n == 0) return;
  dispatch_float(p.dtype, "cuda softmax", [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto log_tag) {
      constexpr bool kLog = decltype(log_tag)::value;
      if (p.n <= kWarpRowLimit) {
        softmax_kernel<T, 32, kLog><<<row_grid(p.rows, 32), kThreads, 0, compute_stream()>>>(p);
      } else {
        softmax_kernel<T, kThreads, kLog><<<row_grid(p.rows, kThreads), kThreads, 0, compute_stream()>>>(p);
      }
      check_last_launch("softmax_kernel");
    };
    if (p.log) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
}

void launch_softmax_backward(const SoftmaxGradParams& p) {
  if (p.rows == 0 || p.n == 0) return;
  dispatch_float(p.dtype, "cuda softmax_backward", [&](auto tag) {
    using T = decltype(tag);
    if (p.n <= kWarpRowLimit) {
      softmax_backward_kernel<T, 32><<<row_grid(p.rows, 32), kThreads, 0, compute_stream()>>>(p);
    } else {
      softmax_backward_kernel<T, kThreads><<<row_grid(p.rows, kThreads), kThreads, 0, compute_stream()>>>(p);
    }
    check_last_launch("softmax_backward_kernel");
  });
}

}  // namespace loom::cuda
