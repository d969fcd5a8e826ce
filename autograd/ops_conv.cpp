// Image ops: conv2d carries its own rule (tensor/conv.h does the products);
// interpolate_nearest is a composition of differentiable primitives; silu has its own rule (one pass each way).
#include "autograd/ops_conv.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "autograd/ops.h"
#include "tensor/constants.h"
#include "tensor/ops.h"

namespace loom {

using GradList = std::vector<Tensor>;
using Needs = std::vector<bool>;

Variable conv2d_after_group_norm_silu(const Variable& x, int64_t groups, const Variable& norm_weight,
                                      const Variable& norm_bias, double eps, const Variable& shift, const Variable& w,
                                      const Variable& bias, const ops::Conv2dParams& p) {
  if (records_gradient({x, norm_weight, norm_bias, shift, w, bias}))
    return conv2d(group_norm_silu(x, groups, norm_weight, norm_bias, eps, shift), w, bias, p);
  LOOM_CHECK(x.defined() && w.defined(), "conv2d_after_group_norm_silu: undefined input or weight");
  LOOM_CHECK(!shift.defined() || shift.shape() == Shape({x.size(0), x.size(1)}),
             "conv2d_after_group_norm_silu: shift ", shift.defined() ? shift.shape() : Shape{}, " must be [",
             x.size(0), ", ", x.size(1), "] for input ", x.shape());
  auto tensor_of = [](const Variable& v) { return v.defined() ? v.tensor() : Tensor(); };
  ops::GroupNormBeforeConv norm;
  norm.groups = groups, norm.eps = eps, norm.silu = true;
  norm.weight = tensor_of(norm_weight), norm.bias = tensor_of(norm_bias), norm.shift = tensor_of(shift);
  return Variable(ops::conv2d_normed(x.tensor(), norm, w.tensor(), tensor_of(bias), p));
}

Variable conv2d(const Variable& x, const Variable& w, const Variable& bias, const ops::Conv2dParams& p) {
  LOOM_CHECK(x.defined() && w.defined(), "conv2d: undefined input or weight");
  const Tensor tx = x.tensor(), tw = w.tensor();
  const Tensor y = ops::conv2d(tx, tw, bias.defined() ? bias.tensor() : Tensor(), p);
  std::vector<Variable> inputs{x, w};
  if (bias.defined()) inputs.push_back(bias);
  // Save only what the rules read: x for dW (columns recomputed), W for dx.
  const Tensor save_x = w.requires_grad() ? tx : Tensor(), save_w = x.requires_grad() ? tw : Tensor();
  const Shape x_shape = tx.shape(), w_shape = tw.shape();
  return record("conv2d", y, inputs, [save_x, save_w, x_shape, w_shape, p](const Tensor& g, const Needs& needs) {
    GradList grads(needs.size());
    if (needs[0]) grads[0] = ops::conv2d_input_grad(g, save_w, x_shape, p);
    if (needs[1]) grads[1] = ops::conv2d_weight_grad(g, save_x, w_shape, p);
    if (needs.size() > 2 && needs[2]) grads[2] = ops::sum(g, {0, 2, 3});  // [O]
    return grads;
  });
}

namespace {
// One-hot selection matrix [out, in]: row o picks PyTorch's nearest source index. Made once per
// (in, out, dtype, device) and kept (tensor/constants.h): no host copy inside a step, which a CUDA
// graph capture of a UNet whose skips are not exactly twice the upsampled size would refuse.
const Tensor& nearest_selection(int64_t in, int64_t out, DType dtype, Device device) {
  return cached_constant("nearest_selection", {out, in}, dtype, device, [in, out] {
    std::vector<double> s(size_t(out * in), 0.0);
    const float scale = float(in) / float(out);
    for (int64_t o = 0; o < out; ++o) {
      const int64_t src = std::min(int64_t(std::floor(float(o) * scale)), in - 1);
      s[size_t(o * in + src)] = 1.0;
    }
    return s;
  });
}
}  // namespace

Variable interpolate_nearest(const Variable& x, int64_t out_h, int64_t out_w) {
  LOOM_CHECK(x.defined() && x.dim() == 4, "interpolate_nearest: input must be [N, C, H, W], got ",
             x.defined() ? x.shape() : Shape{});
  LOOM_CHECK(out_h >= 1 && out_w >= 1, "interpolate_nearest: output size must be positive, got ", out_h, "x",
             out_w);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  if (out_h == 2 * h && out_w == 2 * w) {
    // [N, C, H, 1, W, 1] -> expand [N, C, H, 2, W, 2] -> [N, C, 2H, 2W]; the engine sums the gradient back.
    const Variable v = reshape(x, {n, c, h, 1, w, 1});
    return reshape(expand(v, {n, c, h, 2, w, 2}), {n, c, out_h, out_w});
  }
  // y = S_h · x · S_wᵀ with one-hot S: each output is exactly one input value (no rounding).
  const Variable sh(nearest_selection(h, out_h, x.dtype(), x.device()));
  const Variable swt(nearest_selection(w, out_w, x.dtype(), x.device()).transpose(0, 1).contiguous());
  return matmul(matmul(sh, x), swt);  // [oh, H] x [N, C, H, W] -> [N, C, oh, W]; x [W, ow] -> [N, C, oh, ow]
}

Variable silu(const Variable& x) {
  const Tensor tx = x.tensor();
  return record("silu", ops::silu(tx), {x},
                [tx](const Tensor& g, const Needs&) { return GradList{ops::mul(g, ops::silu_grad(tx))}; });
}

}  // namespace loom
