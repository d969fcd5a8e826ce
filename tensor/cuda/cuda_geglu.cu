// The fused elementwise family (params in cuda_fused.h), grid-stride loops:
// GEGLU forward and backward over [rows, h] (x [rows, 2h] holds the halves h,
// first, and g), and the bias + residual add over [rows, n].
#include <type_traits>

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

// y[r, j] = x[r, j]·gelu(x[r, h + j]), over packs of V consecutive j (V = 1, or a 16-byte pack
// when h is a multiple of it and x, y are aligned: the launcher's choice).
template <typename T, bool kApprox, int V>
__global__ void geglu_kernel(GegluParams p) {
  using P = PackN<T, V>;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.out);
  const int64_t hp = p.h / V, total = p.rows * hp;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / hp, j = (i - r * hp) * V;
    const T* xr = x + r * 2 * p.h;
    const P a = *reinterpret_cast<const P*>(xr + j), g = *reinterpret_cast<const P*>(xr + p.h + j);
    P out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = narrow<T>(widen(a.v[k]) * gelu_of<kApprox>(widen(g.v[k])));
    *reinterpret_cast<P*>(y + r * p.h + j) = out;
  }
}

// dx[r, j] = dy·gelu(g),  dx[r, h + j] = dy·x[r, j]·gelu'(g),  g = x[r, h + j]; packs as above.
template <typename T, bool kApprox, int V>
__global__ void geglu_backward_kernel(GegluParams p) {
  using C = compute_t<T>;
  using P = PackN<T, V>;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.out);
  const int64_t hp = p.h / V, total = p.rows * hp;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / hp, j = (i - r * hp) * V;
    const T* xr = x + r * 2 * p.h;
    T* dxr = dx + r * 2 * p.h;
    const P a = *reinterpret_cast<const P*>(xr + j), gp = *reinterpret_cast<const P*>(xr + p.h + j);
    const P d = *reinterpret_cast<const P*>(dy + r * p.h + j);
    P da, dg;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const C g = widen(d.v[k]), hv = widen(a.v[k]), gv = widen(gp.v[k]);
      da.v[k] = narrow<T>(g * gelu_of<kApprox>(gv));
      dg.v[k] = narrow<T>(g * hv * gelu_grad_of<kApprox>(gv));
    }
    *reinterpret_cast<P*>(dxr + j) = da;
    *reinterpret_cast<P*>(dxr + p.h + j) = dg;
  }
}

// out = (y + bias[j]) + residual over [rows, n, inner] (j the middle index), in the compute type.
template <typename T>
__global__ void bias_residual_kernel(BiasResidualParams p) {
  const T* y = static_cast<const T*>(p.y);
  const T* b = static_cast<const T*>(p.bias);
  const T* res = static_cast<const T*>(p.residual);
  T* out = static_cast<T*>(p.out);
  const int64_t total = p.rows * p.n * p.inner;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    auto v = widen(y[i]);
    if (b) v = v + widen(b[(i / p.inner) % p.n]);
    out[i] = narrow<T>(v + widen(res[i]));
  }
}

// The same over 16-byte packs of all three (aligned), inner > 1 a multiple of the pack, so that a
// pack lies within one channel j and takes one bias value; the index math in 32 bits (total
// elements < 2^31).
template <typename T>
__global__ void bias_residual_inner_kernel(BiasResidualParams p) {
  using P = Pack16<T>;
  constexpr int V = P::kSize;
  const T* b = static_cast<const T*>(p.bias);
  const uint32_t packs = uint32_t(p.rows * p.n * p.inner / V), inner_packs = uint32_t(p.inner / V);
  const uint32_t n = uint32_t(p.n);
  for (uint32_t q = blockIdx.x * blockDim.x + threadIdx.x; q < packs; q += gridDim.x * blockDim.x) {
    P v = static_cast<const P*>(p.y)[q];
    const P r = static_cast<const P*>(p.residual)[q];
    const compute_t<T> bj = b ? widen(b[(q / inner_packs) % n]) : compute_t<T>(0);
#pragma unroll
    for (int k = 0; k < V; ++k) v.v[k] = narrow<T>((b ? widen(v.v[k]) + bj : widen(v.v[k])) + widen(r.v[k]));
    static_cast<P*>(p.out)[q] = v;
  }
}

}  // namespace

void launch_bias_residual(const BiasResidualParams& p) {
  if (p.rows == 0 || p.n == 0 || p.inner == 0) return;
  dispatch_float(p.dtype, "cuda bias_residual", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Pack16<T>::kSize;
    const int64_t total = p.rows * p.n * p.inner;
    if (p.inner > 1 && p.inner % V == 0 && total < (int64_t(1) << 31) && aligned16(p.y) && aligned16(p.residual) &&
        aligned16(p.out)) {
      bias_residual_inner_kernel<T><<<grid_for(total / V), kThreads, 0, compute_stream()>>>(p);
      check_last_launch("bias_residual_kernel (16-byte, per channel)");
      return;
    }
    bias_residual_kernel<T><<<grid_for(total), kThreads, 0, compute_stream()>>>(p);
    check_last_launch("bias_residual_kernel");
  });
}

namespace {

// Calls launch(T{}, integral_constant<int, V>{}, grid) with V the dtype's 16-byte pack where h
// is a multiple of it and the pointers are `aligned`, else 1; grid covers rows·h/V packs.
template <typename Launch>
void launch_packed(const GegluParams& p, bool aligned, const char* what, Launch&& launch) {
  dispatch_float(p.dtype, what, [&](auto tag) {
    constexpr int V = Pack16<decltype(tag)>::kSize;
    if (p.h % V == 0 && aligned) launch(tag, std::integral_constant<int, V>{}, grid_for(p.rows * (p.h / V)));
    else launch(tag, std::integral_constant<int, 1>{}, grid_for(p.rows * p.h));
  });
}
}  // namespace

void launch_geglu(const GegluParams& p) {
  if (p.rows == 0 || p.h == 0) return;
  launch_packed(p, aligned16(p.x) && aligned16(p.out), "cuda geglu", [&](auto tag, auto v, unsigned grid) {
    using T = decltype(tag);
    constexpr int V = decltype(v)::value;
    if (p.approximate) geglu_kernel<T, true, V><<<grid, kThreads, 0, compute_stream()>>>(p);
    else geglu_kernel<T, false, V><<<grid, kThreads, 0, compute_stream()>>>(p);
  });
  check_last_launch("geglu_kernel");
}

void launch_geglu_backward(const GegluParams& p) {
  if (p.rows == 0 || p.h == 0) return;
  const bool aligned = aligned16(p.x) && aligned16(p.dy) && aligned16(p.out);
  launch_packed(p, aligned, "cuda geglu_backward", [&](auto tag, auto v, unsigned grid) {
    using T = decltype(tag);
    constexpr int V = decltype(v)::value;
    if (p.approximate) geglu_backward_kernel<T, true, V><<<grid, kThreads, 0, compute_stream()>>>(p);
    else geglu_backward_kernel<T, false, V><<<grid, kThreads, 0, compute_stream()>>>(p);
  });
  check_last_launch("geglu_backward_kernel");
}

}  // namespace loom::cuda
