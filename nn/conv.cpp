#include "nn/conv.h"

#include <cmath>

#include "nn/norm.h"

namespace loom::nn {

Conv2d::Conv2d(const Conv2dOptions& o, Generator& gen, DType dtype, Device device) : options_(o) {
  LOOM_CHECK(o.in_channels > 0 && o.out_channels > 0, "Conv2d: channels must be positive, got in ", o.in_channels,
             ", out ", o.out_channels);
  LOOM_CHECK(o.kernel_h > 0 && o.kernel_w > 0 && o.stride > 0 && o.padding >= 0, "Conv2d: bad geometry: kernel ",
             o.kernel_h, "x", o.kernel_w, ", stride ", o.stride, ", padding ", o.padding);
  const double bound = 1.0 / std::sqrt(double(o.in_channels * o.kernel_h * o.kernel_w));
  weight_ = register_parameter(
      "weight", Tensor::rand({o.out_channels, o.in_channels, o.kernel_h, o.kernel_w}, gen, dtype, device, -bound, bound));
  if (o.bias) bias_ = register_parameter("bias", Tensor::rand({o.out_channels}, gen, dtype, device, -bound, bound));
}

Conv2d::Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride, int64_t padding, bool bias,
               Generator& gen, DType dtype, Device device)
    : Conv2d(Conv2dOptions{in_channels, out_channels, kernel, kernel, stride, padding, bias}, gen, dtype, device) {}

void Conv2d::check_input(const Variable& x) const {
  LOOM_CHECK(x.defined() && x.dim() == 4 && x.size(1) == options_.in_channels, "Conv2d: expected input [N, ",
             options_.in_channels, ", H, W], got ", x.defined() ? x.shape() : Shape{});
}

Variable Conv2d::base_forward(const Variable& x) const {
  check_input(x);
  return conv2d(x, weight_, bias_, params());
}

Variable Conv2d::base_forward_without_bias(const Variable& x) const {
  check_input(x);
  return conv2d(x, weight_, Variable(), params());
}

Variable Conv2d::forward_after_group_norm_silu(const GroupNorm& norm, const Variable& x, const Variable& shift) const {
  if (GradMode::is_enabled() || (extension_ && !extension_->is_base_forward())) return Variable();
  check_input(x);
  return conv2d_after_group_norm_silu(x, norm.groups(), norm.weight(), norm.bias(), norm.eps(), shift, weight_,
                                      Variable(), params());
}

Variable Conv2d::forward(const Variable& x) const {
  return extension_ ? extension_->forward(*this, x) : base_forward(x);
}

Variable Conv2d::forward_without_bias(const Variable& x) const {
  return extension_ ? extension_->forward_without_bias(*this, x) : base_forward_without_bias(x);
}

}  // namespace loom::nn
