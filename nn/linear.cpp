#include "nn/linear.h"

#include <cmath>
#include <numeric>
#include <typeinfo>

#include "autograd/ops.h"

namespace loom::nn {

Linear::Linear(int64_t in_features, int64_t out_features, bool bias, Generator& gen, DType dtype, Device device)
    : Linear(in_features, out_features, Shape{out_features, in_features}, bias, gen, dtype, device) {}

Linear::Linear(int64_t in_features, int64_t out_features, const Shape& weight_shape, bool bias, Generator& gen,
               DType dtype, Device device)
    : in_(in_features), out_(out_features) {
  LOOM_CHECK(in_features > 0 && out_features > 0, type_name(), ": features must be positive, got in ", in_features,
             ", out ", out_features);
  LOOM_ASSERT(shape_numel(weight_shape) == in_features * out_features);
  const double bound = 1.0 / std::sqrt(double(in_features));  // U(−1/√in, 1/√in)
  weight_ = register_parameter("weight", Tensor::rand(weight_shape, gen, dtype, device, -bound, bound));
  if (bias) bias_ = register_parameter("bias", Tensor::rand({out_features}, gen, dtype, device, -bound, bound));
}

void Linear::check_input_features(const Variable& x, int64_t feature_dim, const char* op) const {
  LOOM_CHECK(x.defined() && x.dim() >= 1 && x.size(feature_dim) == in_, op, ": expected ", in_,
             " input features in dim ", feature_dim, ", got input ", x.defined() ? x.shape() : Shape{});
}

Variable Linear::weight_matrix() const {
  return weight_.dim() == 2 ? weight_ : reshape(weight_, {out_, in_});
}

Variable Linear::base_forward(const Variable& x) const {
  check_input_features(x, -1, "Linear");
  return linear(x, weight_matrix_as(x.dtype()), bias_as(x.dtype()));  // [..., in] x [in, out] -> [..., out]
}

Variable Linear::weight_matrix_as(DType dtype) const { return to_dtype(weight_matrix(), dtype); }

Variable Linear::bias_as(DType dtype) const { return bias_.defined() ? to_dtype(bias_, dtype) : bias_; }

Variable Linear::forward(const Variable& x) const {
  return extension_ ? extension_->forward(*this, x) : base_forward(x);
}

std::vector<Variable> forward_shared_input(const std::vector<const Linear*>& linears, const Variable& x) {
  std::vector<const Linear*> extended;  // plain Linears with an extension: offered to be computed together
  std::vector<size_t> where;
  for (size_t i = 0; i < linears.size(); ++i) {
    LOOM_CHECK(linears[i] != nullptr, "forward_shared_input: linear ", i, " is null");
    if (linears[i]->extension() && typeid(*linears[i]) == typeid(Linear))
      extended.push_back(linears[i]), where.push_back(i);
  }
  std::vector<Variable> ys(linears.size());
  if (extended.size() >= 2) {
    std::vector<Variable> shared = extended[0]->extension()->forward_shared(extended, x);
    LOOM_CHECK(shared.empty() || shared.size() == extended.size(), "forward_shared_input: the extension returned ",
               shared.size(), " outputs for ", extended.size(), " Linears");
    for (size_t j = 0; j < shared.size(); ++j) ys[where[j]] = std::move(shared[j]);
  }
  for (size_t i = 0; i < linears.size(); ++i)
    if (!ys[i].defined()) ys[i] = linears[i]->forward(x);
  return ys;
}

Conv1x1::Conv1x1(int64_t in_channels, int64_t out_channels, bool bias, Generator& gen, DType dtype, Device device)
    : Linear(in_channels, out_channels, Shape{out_channels, in_channels, 1, 1}, bias, gen, dtype, device) {}

Variable Conv1x1::forward(const Variable& x) const {
  LOOM_CHECK(x.defined() && x.dim() >= 2, "Conv1x1: input must be [B, C, *spatial], got ",
             x.defined() ? x.shape() : Shape{});
  check_input_features(x, 1, "Conv1x1");
  const int64_t n = x.dim();
  std::vector<int64_t> to_last(static_cast<size_t>(n)), to_first(static_cast<size_t>(n));
  std::iota(to_last.begin(), to_last.end(), 0);  // [0, 2, ..., n-1, 1]
  to_last.erase(to_last.begin() + 1);
  to_last.push_back(1);
  for (int64_t d = 0; d < n; ++d) to_first[size_t(to_last[size_t(d)])] = d;  // inverse permutation
  // [B, C, *] -> [B, *, C] -> Linear -> [B, *, out] -> [B, out, *]
  return permute(Linear::forward(permute(x, to_last)), to_first);
}

}  // namespace loom::nn
