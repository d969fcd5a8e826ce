// clip_grad_norm (PyTorch's clip_grad_norm_ with error_if_nonfinite = false).
#include "optim/clip.h"

#include <cmath>

#include "tensor/ops.h"

namespace loom::optim {

namespace {

// Σ g² of one gradient, accumulated in f32 at least.
double sum_of_squares(const Tensor& g) {
  const bool half = g.dtype() == DType::BF16 || g.dtype() == DType::F16;
  return ops::sum(ops::square(half ? g.to(DType::F32) : g)).item();
}

}  // namespace

double clip_grad_norm(const std::vector<Variable>& params, double max_norm) {
  LOOM_CHECK(max_norm >= 0, "clip_grad_norm: max_norm must be >= 0, got ", max_norm);
  NoGradGuard no_grad;
  double total_sq = 0;
  for (const auto& v : params)
    if (v.defined() && v.grad().defined()) total_sq += sum_of_squares(v.grad());
  const double total = std::sqrt(total_sq);
  const double coef = max_norm / (total + 1e-6);
  if (coef >= 1.0) return total;  // also false for NaN: NaN scales, as in PyTorch
  for (const auto& v : params)
    if (v.defined() && v.grad().defined()) v.set_grad(ops::mul_scalar(v.grad(), coef));
  return total;
}

double clip_grad_norm(const NamedParameters& params, double max_norm) {
  std::vector<Variable> vs;
  vs.reserve(params.size());
  for (const auto& p : params) vs.push_back(p.second);
  return clip_grad_norm(vs, max_norm);
}

}  // namespace loom::optim
