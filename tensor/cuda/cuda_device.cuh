// Device-side helpers shared by the CUDA kernel files (cuda_kernels.cu and the
// fused family cuda_layer_norm.cu, cuda_group_norm.cu, cuda_geglu.cu, cuda_optim.cu): compute types and
// conversions between storage and compute values, dtype dispatch for launchers,
// float/double math overloads, and warp/block reductions. Include only from .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "tensor/cuda/cuda_common.h"

namespace loom::cuda {

// ---- types and conversions ----------------------------------------------------------

// The type arithmetic is carried out in: float for f32/bf16/f16, double for f64
// (and for i64 values on their way to another dtype).
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };
template <> struct Compute<int64_t> { using type = double; };
template <typename T> using compute_t = typename Compute<T>::type;

constexpr double kTwo63 = 9223372036854775808.0;

// N consecutive elements loaded / stored as one aligned vector access (the pointer must be
// aligned to the pack's size). Pack16<T>: 16 bytes (8 bf16 / f16, 4 f32, 2 f64 / i64).
template <typename T, int N>
struct alignas(sizeof(T) * N) PackN {
  static constexpr int kSize = N;
  T v[N];
};
template <typename T>
using Pack16 = PackN<T, 16 / sizeof(T)>;

// Storage value -> its compute value (16-bit floats widen to float).
template <typename T>
__device__ __forceinline__ compute_t<T> widen(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return static_cast<compute_t<T>>(x);
  }
}

// A compute value (float or double) -> storage type To, as the CPU backend does:
// 16-bit floats round to nearest even from float (a double goes through float
// first); I64 truncates toward zero, saturates out of range, and maps NaN to 0.
template <typename To, typename W>
__device__ __forceinline__ To narrow(W w) {
  if constexpr (std::is_same_v<To, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(w));
  } else if constexpr (std::is_same_v<To, __half>) {
    return __float2half_rn(static_cast<float>(w));
  } else if constexpr (std::is_same_v<To, int64_t>) {
    const double v = static_cast<double>(w);
    if (v != v) return 0;
    if (v >= kTwo63) return INT64_MAX;
    if (v <= -kTwo63) return INT64_MIN;
    return static_cast<int64_t>(v);
  } else {
    return static_cast<To>(w);
  }
}

// Storage Src -> storage Dst for copies: the value itself when the types agree
// (exact for i64), otherwise through the compute types (i64 through double).
template <typename Dst, typename Src>
__device__ __forceinline__ Dst convert(Src x) {
  if constexpr (std::is_same_v<Dst, Src>) {
    return x;
  } else {
    return narrow<Dst>(widen(x));
  }
}

// Calls f(T{}) with T the device type of `dtype`.
template <typename F>
void dispatch_all(DType dtype, const char* what, F&& f) {
  switch (dtype) {
    case DType::F32: f(float{}); return;
    case DType::F64: f(double{}); return;
    case DType::BF16: f(__nv_bfloat16{}); return;
    case DType::F16: f(__half{}); return;
    case DType::I64: f(int64_t{}); return;
  }
  LOOM_FAIL(what, ": unknown dtype ", int(dtype));
}

// As dispatch_all for the floating dtypes; I64 is an error naming the device and dtype.
template <typename F>
void dispatch_float(DType dtype, const char* what, F&& f) {
  switch (dtype) {
    case DType::F32: f(float{}); return;
    case DType::F64: f(double{}); return;
    case DType::BF16: f(__nv_bfloat16{}); return;
    case DType::F16: f(__half{}); return;
    case DType::I64: break;
  }
  LOOM_FAIL(what, ": not supported by the cuda backend for dtype ", dtype);
}

// ---- math wrappers (float and double overloads) --------------------------------------

__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }
__device__ __forceinline__ float m_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double m_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float m_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double m_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float m_erf(float x) { return erff(x); }
__device__ __forceinline__ double m_erf(double x) { return erf(x); }
__device__ __forceinline__ float m_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double m_abs(double x) { return fabs(x); }
__device__ __forceinline__ float m_pow(float x, float y) { return powf(x, y); }
__device__ __forceinline__ double m_pow(double x, double y) { return pow(x, y); }
__device__ __forceinline__ bool m_isnan(float x) { return isnan(x); }
__device__ __forceinline__ bool m_isnan(double x) { return isnan(x); }

// ---- GELU and its derivative (C = float or double) -----------------------------------

template <typename C>
__device__ __forceinline__ C gelu_erf(C x) {  // x·Φ(x)
  return C(0.5) * x * (C(1) + m_erf(x * C(0.70710678118654752440)));
}

template <typename C>
__device__ __forceinline__ C gelu_erf_grad(C x) {  // Φ(x) + x·φ(x)
  return C(0.5) * (C(1) + m_erf(x * C(0.70710678118654752440))) +
         x * C(0.39894228040143267794) * m_exp(C(-0.5) * x * x);
}

template <typename C>
__device__ __forceinline__ C gelu_tanh(C x) {  // 0.5·x·(1 + tanh(√(2/π)(x + a·x³)))
  return C(0.5) * x * (C(1) + m_tanh(C(0.79788456080286535588) * (x + C(0.044715) * x * x * x)));
}

template <typename C>
__device__ __forceinline__ C gelu_tanh_grad(C x) {  // 0.5(1 + t) + 0.5·x·(1 − t²)·√(2/π)(1 + 3a·x²)
  const C k = C(0.79788456080286535588), a = C(0.044715);
  const C t = m_tanh(k * (x + a * x * x * x));
  return C(0.5) * (C(1) + t) + C(0.5) * x * (C(1) - t * t) * k * (C(1) + C(3) * a * x * x);
}

// ---- reductions ----------------------------------------------------------------------

template <ReduceOp op, typename Acc>
struct Reducer {
  __device__ __forceinline__ static Acc identity() {
    if constexpr (op == ReduceOp::Sum) return Acc(0);
    else return -INFINITY;
  }
  __device__ __forceinline__ static Acc combine(Acc a, Acc b) {
    if constexpr (op == ReduceOp::Sum) return a + b;
    else return (b > a || m_isnan(b)) ? b : a;  // NaN, once seen, stays
  }
};

// Reduces v over a group of kGroup consecutive threads (32: one warp; more: the
// whole block, blockDim.x == kGroup) and returns the result to every thread of the group. For the
// block form, every thread of the block must call it (it synchronizes), and
// `scratch` must hold kGroup / 32 values.
template <int kGroup, typename R, typename Acc>
__device__ __forceinline__ Acc group_reduce(Acc v, Acc* scratch) {
  static_assert(kGroup == 32 || (kGroup % 32 == 0 && kGroup <= 1024), "a group is a warp or the whole block");
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = R::combine(v, __shfl_xor_sync(0xffffffffu, v, off));
  if constexpr (kGroup > 32) {
    __syncthreads();  // the previous call's readers are done with scratch
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    v = scratch[0];
#pragma unroll
    for (int w = 1; w < kGroup / 32; ++w) v = R::combine(v, scratch[w]);
  }
  return v;
}

}  // namespace loom::cuda
