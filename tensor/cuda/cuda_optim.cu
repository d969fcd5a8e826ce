// The multi-tensor optimizer update (params in cuda_fused.h): one launch updates
// every tensor of the table. Block b takes chunk b of the concatenated tensors
// (kUpdateChunk elements; its tensor found by binary search on first_block) with
// a grid-stride loop over chunks. The arithmetic is the composed update's, op by
// op in T with scalars rounded to T (this file is compiled with --fmad=false), so
// CUDA, the CPU kernel and optim/'s former op chains agree bit for bit.
// Also loss scaling's unscale + finite check over a table of gradients, in the same chunking.
#include "tensor/cuda/cuda_device.cuh"
#include "tensor/cuda/cuda_fused.h"

namespace loom::cuda {
namespace {

// The table entry whose chunks contain chunk `b` (entries in first_block order).
__device__ __forceinline__ int entry_of(const OptimizerUpdateParams& p, int64_t b) {
  int lo = 0, hi = p.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.tensors[mid].first_block <= b) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__device__ __forceinline__ void sgd_element(const OptimizerUpdateParams& p, const UpdateTensorParams& e, int64_t i) {
  T* param = static_cast<T*>(e.param);
  const T* grad = static_cast<const T*>(e.grad);
  T d = grad[i];
  if (p.weight_decay != 0) d = d + param[i] * T(p.weight_decay);
  if (p.momentum != 0) {
    T* buf = static_cast<T*>(e.state1);
    const T mu = T(p.momentum);
    const T b = e.first ? d : buf[i] * mu + d * T(1.0 - p.dampening);
    buf[i] = b;
    d = p.nesterov ? d + b * mu : b;
  }
  param[i] = param[i] - d * T(p.lr);
}

template <typename T>
__device__ __forceinline__ void adam_element(const OptimizerUpdateParams& p, const UpdateTensorParams& e,
                                             int64_t i) {
  T* param = static_cast<T*>(e.param);
  const T* grad = static_cast<const T*>(e.grad);
  T* m = static_cast<T*>(e.state1);
  T* v = static_cast<T*>(e.state2);
  T pv = param[i], gv = grad[i];
  if (p.weight_decay != 0 && p.kind == OptimizerKind::AdamW) pv = pv * T(1.0 - p.lr * p.weight_decay);
  if (p.weight_decay != 0 && p.kind == OptimizerKind::Adam) gv = gv + pv * T(p.weight_decay);
  const T mv = m[i] * T(p.beta1) + gv * T(1.0 - p.beta1);
  const T vv = v[i] * T(p.beta2) + (gv * gv) * T(1.0 - p.beta2);
  m[i] = mv;
  v[i] = vv;
  const T denom = m_sqrt(vv) * T(e.inv_bias2_sqrt) + T(p.eps);
  param[i] = pv - (mv / denom) * T(e.step_size);
}

template <typename T>
__global__ void optimizer_update_kernel(const __grid_constant__ OptimizerUpdateParams p) {
  for (int64_t b = blockIdx.x; b < p.total_blocks; b += gridDim.x) {
    const UpdateTensorParams& e = p.tensors[entry_of(p, b)];
    const int64_t start = (b - e.first_block) * kUpdateChunk;
    const int64_t end = start + kUpdateChunk < e.numel ? start + kUpdateChunk : e.numel;
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      if (p.kind == OptimizerKind::Sgd) sgd_element<T>(p, e, i);
      else adam_element<T>(p, e, i);
    }
  }
}

// The table entry whose chunks contain chunk `b` (entries in first_block order).
__device__ __forceinline__ int unscale_entry_of(const UnscaleParams& p, int64_t b) {
  int lo = 0, hi = p.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.tensors[mid].first_block <= b) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__global__ void unscale_check_finite_kernel(const __grid_constant__ UnscaleParams p) {
  using C = compute_t<T>;
  const C inv = C(p.inv_scale);
  bool found = false;
  for (int64_t b = blockIdx.x; b < p.total_blocks; b += gridDim.x) {
    const UnscaleTensorParams& e = p.tensors[unscale_entry_of(p, b)];
    T* x = static_cast<T*>(e.data);
    const int64_t start = (b - e.first_block) * kUpdateChunk;
    const int64_t end = start + kUpdateChunk < e.numel ? start + kUpdateChunk : e.numel;
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) {
      const C v = widen(x[i]);
      if (!isfinite(v)) found = true;
      x[i] = narrow<T>(v * inv);
    }
  }
  if (found) *p.found_inf = 1.0f;  // every writer writes the same value
}

}  // namespace

void launch_unscale_check_finite(const UnscaleParams& p) {
  if (p.count == 0 || p.total_blocks == 0) return;
  const unsigned grid = unsigned(p.total_blocks < 65535 ? p.total_blocks : 65535);
  dispatch_float(p.dtype, "cuda unscale_check_finite", [&](auto tag) {
    using T = decltype(tag);
    unscale_check_finite_kernel<T><<<grid, kThreads, 0, compute_stream()>>>(p);
    check_last_launch("unscale_check_finite_kernel");
  });
}

void launch_optimizer_update(const OptimizerUpdateParams& p) {
  if (p.count == 0 || p.total_blocks == 0) return;
  const unsigned grid = unsigned(p.total_blocks < 65535 ? p.total_blocks : 65535);
  if (p.dtype == DType::F32) {
    optimizer_update_kernel<float><<<grid, kThreads, 0, compute_stream()>>>(p);
  } else if (p.dtype == DType::F64) {
    optimizer_update_kernel<double><<<grid, kThreads, 0, compute_stream()>>>(p);
  } else {
    LOOM_FAIL("cuda optimizer_update: parameters of dtype ", p.dtype, " are not supported (f32 or f64)");
  }
  check_last_launch("optimizer_update_kernel");
}

}  // namespace loom::cuda
