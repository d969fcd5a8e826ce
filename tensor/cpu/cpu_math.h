// Scalar math shared by the CPU kernels (cpu_backend.cpp, cpu_fused.cpp): the
// GELU forms and their derivatives, for T = float or double.
#pragma once

#include <cmath>

namespace loom::cpu {

constexpr double kSqrt1_2 = 0.70710678118654752440;      // 1/√2
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/√(2π)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // √(2/π)
constexpr double kGeluCoef = 0.044715;

template <typename T> T gelu_erf(T x) { return T(0.5) * x * (T(1) + std::erf(x * T(kSqrt1_2))); }

// Φ(x) + x·φ(x)
template <typename T> T gelu_erf_grad(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(kSqrt1_2)));
  const T pdf = T(kInvSqrt2Pi) * std::exp(T(-0.5) * x * x);
  return cdf + x * pdf;
}

template <typename T> T gelu_tanh(T x) {
  const T u = T(kSqrt2OverPi) * (x + T(kGeluCoef) * x * x * x);
  return T(0.5) * x * (T(1) + std::tanh(u));
}

// d/dx 0.5·x·(1 + tanh u) = 0.5·(1 + t) + 0.5·x·(1 − t²)·u',  u' = √(2/π)(1 + 3·0.044715x²)
template <typename T> T gelu_tanh_grad(T x) {
  const T u = T(kSqrt2OverPi) * (x + T(kGeluCoef) * x * x * x);
  const T t = std::tanh(u);
  const T du = T(kSqrt2OverPi) * (T(1) + T(3 * kGeluCoef) * x * x);
  return T(0.5) * (T(1) + t) + T(0.5) * x * (T(1) - t * t) * du;
}

}  // namespace loom::cpu
