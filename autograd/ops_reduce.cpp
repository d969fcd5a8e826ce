// Reductions and the softmax family: forward and gradient rule side by side.
#include "autograd/ops.h"
#include "tensor/ops.h"

namespace loom {

using GradList = std::vector<Tensor>;
using Needs = std::vector<bool>;

namespace {
// x's shape with the reduced dims kept as size 1.
Shape keepdim_shape(const Shape& shape, const std::vector<int64_t>& dims) {
  Shape kept = shape;
  for (int64_t d : dims) kept[d] = 1;
  return kept;
}
}  // namespace

Variable sum(const Variable& x, const std::vector<int64_t>& dims, bool keepdim) {
  const Shape in_shape = x.shape();
  const Shape kept = keepdim_shape(in_shape, ops::reduction_dims(dims, x.dim(), "sum"));
  return record("sum", ops::sum(x.tensor(), dims, keepdim), {x}, [in_shape, kept](const Tensor& g, const Needs&) {
    return GradList{g.reshape(kept).expand(in_shape)};  // every summed element receives g
  });
}

Variable mean(const Variable& x, const std::vector<int64_t>& dims, bool keepdim) {
  const Shape in_shape = x.shape();
  const std::vector<int64_t> ds = ops::reduction_dims(dims, x.dim(), "mean");
  const Shape kept = keepdim_shape(in_shape, ds);
  int64_t n = 1;
  for (int64_t d : ds) n *= in_shape[d];
  return record("mean", ops::mean(x.tensor(), dims, keepdim), {x},
                [in_shape, kept, n](const Tensor& g, const Needs&) {
                  return GradList{ops::mul_scalar(g, 1.0 / double(n)).reshape(kept).expand(in_shape)};
                });
}

Variable softmax(const Variable& x, int64_t dim) {
  const Tensor y = ops::softmax(x.tensor(), dim);
  return record("softmax", y, {x}, [y, dim](const Tensor& g, const Needs&) {
    return GradList{ops::softmax_backward(y, g, dim)};  // y ∘ (g − Σ_dim g∘y)
  });
}

Variable log_softmax(const Variable& x, int64_t dim) {
  const Tensor y = ops::log_softmax(x.tensor(), dim);
  return record("log_softmax", y, {x}, [y, dim](const Tensor& g, const Needs&) {
    // dx = g − softmax(x) ∘ Σ_dim g
    return GradList{ops::sub(g, ops::mul(ops::exp(y), ops::sum(g, {dim}, true)))};
  });
}

}  // namespace loom
