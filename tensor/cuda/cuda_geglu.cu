// The fused elementwise family (params in cuda_fused.h), grid-stride loops:
// GEGLU forward and backward over [rows, h] (x [rows, 2h] holds the halves h,
// first, and g), and the bias + residual add over [rows, n].
#include "tensor/cuda/cuda_device.cuh"
#include "tensor/cuda/cuda_fused.h"

namespace loom::cuda {
namespace {

template <bool kApprox, typename C>
__device__ __forceinline__ C gelu_of(C v) {
  if constexpr (kApprox) return gelu_tanh(v);
  else return gelu_erf(v);
}

template <bool kApprox, typename C>
__device__ __forceinline__ C gelu_grad_of(C v) {
  if constexpr (kApprox) return gelu_tanh_grad(v);
  else return gelu_erf_grad(v);
}

// y[r, j] = x[r, j]·gelu(x[r, h + j])
template <typename T, bool kApprox>
__global__ void geglu_kernel(GegluParams p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.out);
  const int64_t total = p.rows * p.h;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.h, j = i - r * p.h;
    const T* xr = x + r * 2 * p.h;
    y[i] = narrow<T>(widen(xr[j]) * gelu_of<kApprox>(widen(xr[p.h + j])));
  }
}

// dx[r, j] = dy·gelu(g),  dx[r, h + j] = dy·x[r, j]·gelu'(g),  g = x[r, h + j]
template <typename T, bool kApprox>
__global__ void geglu_backward_kernel(GegluParams p) {
  using C = compute_t<T>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.out);
  const int64_t total = p.rows * p.h;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.h, j = i - r * p.h;
    const T* xr = x + r * 2 * p.h;
    T* dxr = dx + r * 2 * p.h;
    const C g = widen(dy[i]), hv = widen(xr[j]), gv = widen(xr[p.h + j]);
    dxr[j] = narrow<T>(g * gelu_of<kApprox>(gv));
    dxr[p.h + j] = narrow<T>(g * hv * gelu_grad_of<kApprox>(gv));
  }
}

// out = (y + bias[j]) + residual, in the compute type.
template <typename T>
__global__ void bias_residual_kernel(BiasResidualParams p) {
  const T* y = static_cast<const T*>(p.y);
  const T* b = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  const int64_t total = p.rows * p.n;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    auto v = widen(y[i]);
    if (b) v = v + widen(b[i % p.n]);
    out[i] = narrow<T>(v + widen(res[i]));
  }
}

}  // namespace

void launch_bias_residual(const BiasResidualParams& p) {
  if (p.rows == 0 || p.n == 0) return;
  dispatch_float(p.dtype, "cuda bias_residual", [&](auto tag) {
    using T = decltype(tag);
    bias_residual_kernel<T><<<grid_for(p.rows * p.n), kThreads, 0, compute_stream()>>>(p);
    check_last_launch("bias_residual_kernel");
  });
}

void launch_geglu(const GegluParams& p) {
  if (p.rows == 0 || p.h == 0) return;
  dispatch_float(p.dtype, "cuda geglu", [&](auto tag) {
    using T = decltype(tag);
    if (p.approximate) {
      geglu_kernel<T, true><<<grid_for(p.rows * p.h), kThreads, 0, compute_stream()>>>(p);
    } else {
      geglu_kernel<T, false><<<grid_for(p.rows * p.h), kThreads, 0, compute_stream()>>>(p);
    }
    check_last_launch("geglu_kernel");
  });
}

void launch_geglu_backward(const GegluParams& p) {
  if (p.rows == 0 || p.h == 0) return;
  dispatch_float(p.dtype, "cuda geglu_backward", [&](auto tag) {
    using T = decltype(tag);
    if (p.approximate) {
      geglu_backward_kernel<T, true><<<grid_for(p.rows * p.h), kThreads, 0, compute_stream()>>>(p);
    } else {
      geglu_backward_kernel<T, false><<<grid_for(p.rows * p.h), kThreads, 0, compute_stream()>>>(p);
    }
    check_last_launch("geglu_backward_kernel");
  });
}

}  // namespace loom::cuda
