#include "autograd/gradcheck.h"

#include <cmath>
#include <sstream>

namespace loom {

namespace {

// Address of flat element `flat` (row-major over the shape) of a CPU f64 tensor.
double* element_ptr(const Tensor& t, int64_t flat) {
  int64_t offset = 0;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    offset += (flat % t.shape()[d]) * t.strides()[d];
    flat /= t.shape()[d];
  }
  return t.data<double>() + offset;
}

void check_input(const Variable& v, size_t i) {
  LOOM_CHECK(v.defined() && v.dtype() == DType::F64 && v.device().is_cpu(), "gradcheck: input ", i,
             " must be an f64 CPU variable, got ", v.str());
  LOOM_CHECK(v.is_leaf(), "gradcheck: input ", i, " must be a leaf");
  for (int64_t d = 0; d < v.dim(); ++d)
    LOOM_CHECK(v.shape()[d] == 1 || v.tensor().strides()[d] != 0, "gradcheck: input ", i,
               " is expanded (stride 0 in dim ", d, "); pass a materialised tensor");
}

std::vector<double> evaluate(const GradcheckFn& fn, const std::vector<Variable>& inputs) {
  NoGradGuard no_grad;
  return fn(inputs).tensor().to_vector();
}

}  // namespace

GradcheckResult gradcheck(const GradcheckFn& fn, const std::vector<Variable>& inputs,
                          const GradcheckOptions& opt) {
  for (size_t i = 0; i < inputs.size(); ++i) check_input(inputs[i], i);
  GradcheckResult result;
  const Variable out = fn(inputs);
  LOOM_CHECK(out.dtype() == DType::F64, "gradcheck: output must be f64, got ", out.str());
  LOOM_CHECK(out.requires_grad(), "gradcheck: output does not depend on any input that requires grad");
  const int64_t m = out.numel();

  // analytic[i][j * n_i + e] = ∂out_j / ∂input_i[e]
  std::vector<std::vector<double>> analytic(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].requires_grad()) analytic[i].assign(size_t(m * inputs[i].numel()), 0.0);
  for (int64_t j = 0; j < m; ++j) {
    for (const Variable& v : inputs) v.zero_grad();
    std::vector<double> onehot(size_t(m), 0.0);
    onehot[size_t(j)] = 1.0;
    out.backward(Tensor::from_values(onehot, out.shape(), DType::F64), /*retain_graph=*/true);
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (!inputs[i].requires_grad() || !inputs[i].grad().defined()) continue;
      const std::vector<double> g = inputs[i].grad().to_vector();
      std::copy(g.begin(), g.end(), analytic[i].begin() + j * inputs[i].numel());
    }
  }
  for (const Variable& v : inputs) v.zero_grad();

  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].requires_grad()) continue;
    const int64_t n = inputs[i].numel();
    for (int64_t e = 0; e < n; ++e) {
      double* x = element_ptr(inputs[i].tensor(), e);
      const double saved = *x;
      *x = saved + opt.eps;
      const std::vector<double> plus = evaluate(fn, inputs);
      *x = saved - opt.eps;
      const std::vector<double> minus = evaluate(fn, inputs);
      *x = saved;
      for (int64_t j = 0; j < m; ++j) {
        const double numeric = (plus[j] - minus[j]) / (2.0 * opt.eps);
        const double a = analytic[i][size_t(j * n + e)];
        const double err = std::abs(a - numeric);
        result.max_abs_error = std::max(result.max_abs_error, err);
        ++result.entries_checked;
        if (!(err <= opt.atol + opt.rtol * std::abs(numeric))) {  // also catches NaN
          std::ostringstream os;
          os << "gradcheck: input " << i << " " << inputs[i].shape() << " element " << e << ", output element "
             << j << ": analytic " << a << " vs numeric " << numeric << " (|diff| " << err << ")";
          result.message = os.str();
          return result;
        }
      }
    }
  }
  result.ok = true;
  std::ostringstream os;
  os << "gradcheck: " << result.entries_checked << " Jacobian entries agree (max |diff| " << result.max_abs_error
     << ")";
  result.message = os.str();
  return result;
}

}  // namespace loom
