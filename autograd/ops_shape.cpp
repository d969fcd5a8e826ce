// Shape ops: forward (views where possible) and gradient rule side by side.
#include <numeric>

#include "autograd/ops.h"
#include "tensor/ops.h"

namespace loom {

using GradList = std::vector<Tensor>;
using Needs = std::vector<bool>;

Variable reshape(const Variable& x, const Shape& shape) {
  const Shape in_shape = x.shape();
  return record("reshape", x.tensor().reshape(shape), {x},
                [in_shape](const Tensor& g, const Needs&) { return GradList{g.reshape(in_shape)}; });
}

Variable to_dtype(const Variable& x, DType dtype) {
  if (x.dtype() == dtype) return x;
  const DType from = x.dtype();
  return record("to_dtype", x.tensor().to(dtype), {x},
                [from](const Tensor& g, const Needs&) { return GradList{g.to(from)}; });
}

Variable permute(const Variable& x, const std::vector<int64_t>& dims) {
  const Tensor out = x.tensor().permute(dims);  // validates dims
  std::vector<int64_t> inverse(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) inverse[wrap_dim(dims[i], x.dim(), "permute")] = int64_t(i);
  return record("permute", out, {x},
                [inverse](const Tensor& g, const Needs&) { return GradList{g.permute(inverse)}; });
}

Variable transpose(const Variable& x, int64_t d0, int64_t d1) {
  return record("transpose", x.tensor().transpose(d0, d1), {x},
                [d0, d1](const Tensor& g, const Needs&) { return GradList{g.transpose(d0, d1)}; });
}

Variable expand(const Variable& x, const Shape& shape) {
  // The engine sums the gradient back down to x's shape.
  return record("expand", x.tensor().expand(shape), {x}, [](const Tensor& g, const Needs&) { return GradList{g}; });
}

Variable slice(const Variable& x, int64_t dim, int64_t start, int64_t end, int64_t step) {
  const Tensor tx = x.tensor();
  const Shape in_shape = tx.shape();
  const DType dtype = tx.dtype();
  const Device device = tx.device();
  return record("slice", tx.slice(dim, start, end, step), {x},
                [=](const Tensor& g, const Needs&) {
                  Tensor gx = Tensor::zeros(in_shape, dtype, device);  // zero outside the slice
                  gx.slice(dim, start, end, step).copy_(g);
                  return GradList{gx};
                });
}

Variable unsqueeze(const Variable& x, int64_t dim) {
  const Shape in_shape = x.shape();
  return record("unsqueeze", x.tensor().unsqueeze(dim), {x},
                [in_shape](const Tensor& g, const Needs&) { return GradList{g.reshape(in_shape)}; });
}

Variable squeeze(const Variable& x, int64_t dim) {
  const Shape in_shape = x.shape();
  return record("squeeze", x.tensor().squeeze(dim), {x},
                [in_shape](const Tensor& g, const Needs&) { return GradList{g.reshape(in_shape)}; });
}

Variable cat(const std::vector<Variable>& xs, int64_t dim) {
  std::vector<Tensor> ts;
  std::vector<int64_t> sizes;
  for (const Variable& v : xs) {
    ts.push_back(v.tensor());
    sizes.push_back(v.dim() > 0 ? v.size(wrap_dim(dim, v.dim(), "cat")) : 0);
  }
  const Tensor out = ops::cat(ts, dim);  // validates shapes
  const int64_t d = wrap_dim(dim, out.dim(), "cat");
  return record("cat", out, xs, [sizes, d](const Tensor& g, const Needs& needs) {
    GradList grads(sizes.size());
    int64_t offset = 0;
    for (size_t i = 0; i < sizes.size(); ++i) {
      if (needs[i]) grads[i] = g.narrow(d, offset, sizes[i]);
      offset += sizes[i];
    }
    return grads;
  });
}

std::vector<Variable> split(const Variable& x, const std::vector<int64_t>& sizes, int64_t dim) {
  const int64_t d = wrap_dim(dim, x.dim(), "split");
  const int64_t total = std::accumulate(sizes.begin(), sizes.end(), int64_t(0));
  LOOM_CHECK(total == x.size(d), "split: sizes ", sizes, " add up to ", total, ", but dim ", d, " of ", x.shape(),
             " has size ", x.size(d));
  std::vector<Variable> pieces;
  int64_t offset = 0;
  for (int64_t s : sizes) {
    LOOM_CHECK(s >= 0, "split: negative size in ", sizes);
    pieces.push_back(slice(x, d, offset, offset + s));
    offset += s;
  }
  return pieces;
}

std::vector<Variable> chunk(const Variable& x, int64_t chunks, int64_t dim) {
  LOOM_CHECK(chunks > 0, "chunk: number of chunks must be positive, got ", chunks);
  const int64_t n = x.size(wrap_dim(dim, x.dim(), "chunk"));
  const int64_t each = (n + chunks - 1) / chunks;
  std::vector<int64_t> sizes;
  for (int64_t off = 0; off < n; off += each) sizes.push_back(std::min(each, n - off));
  if (sizes.empty()) sizes.push_back(0);
  return split(x, sizes, dim);
}

}  // namespace loom
