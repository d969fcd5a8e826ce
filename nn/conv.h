// Conv2d: PyTorch's nn.Conv2d with groups = 1, dilation = 1 (zero padding).
//
//   x [N, in, H, W] -> y [N, out, oh, ow],  W (out, in, kh, kw), b (out)
//   oh = (H + 2·padding − kh) / stride + 1 (likewise ow)
//
// Initialised as PyTorch does (kaiming_uniform with a = √5): W and b from
// U(−1/√fan_in, 1/√fan_in), fan_in = in·kh·kw, weight first, then bias.
//
// Like Linear, a Conv2d has an extension hook through which an adapter (a LoRA
// / LoCon) replaces its forward without nn knowing about adapters.
#pragma once

#include <memory>

#include "autograd/ops.h"
#include "nn/module.h"
#include "tensor/random.h"

namespace loom::nn {

class Conv2d;
class GroupNorm;

// A replacement for a Conv2d's forward (see LinearExtension): receives the base
// layer and x [N, in, H, W], returns [N, out, oh, ow]; usually calls base.base_forward(x).
class Conv2dExtension {
 public:
  virtual ~Conv2dExtension() = default;
  virtual Variable forward(const Conv2d& base, const Variable& x) const = 0;
  // forward(base, x) without base's bias, which the caller adds in a later pass (a ResnetBlock2D
  // adds conv biases inside the next norm or residual pass); undefined when the extension cannot
  // leave the bias out (the caller then takes forward()).
  virtual Variable forward_without_bias(const Conv2d& base, const Variable& x) const {
    (void)base, (void)x;
    return Variable();
  }
  // True while forward(base, x) is base.base_forward(x) (an adapter merged into W): the layer may
  // then take its own fused paths (Conv2d::forward_after_group_norm_silu).
  virtual bool is_base_forward() const { return false; }
};

struct Conv2dOptions {
  int64_t in_channels = 0, out_channels = 0;
  int64_t kernel_h = 3, kernel_w = 3;
  int64_t stride = 1;
  int64_t padding = 0;
  bool bias = true;
};

class Conv2d : public UnaryModule {
 public:
  explicit Conv2d(const Conv2dOptions& options, Generator& gen = default_generator(), DType dtype = DType::F32,
                  Device device = Device::cpu());
  // The usual square kernel.
  Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride = 1, int64_t padding = 0,
         bool bias = true, Generator& gen = default_generator(), DType dtype = DType::F32,
         Device device = Device::cpu());
  std::string type_name() const override { return "Conv2d"; }

  Variable forward(const Variable& x) const override;  // the extension's forward when set
  Variable base_forward(const Variable& x) const;      // conv2d(x, W, b), ignoring any extension
  // forward(x) less the bias b, for a caller that adds b (bias()) in a later pass: conv2d(x, W),
  // or the extension's forward_without_bias; undefined when the extension has none.
  Variable forward_without_bias(const Variable& x) const;
  Variable base_forward_without_bias(const Variable& x) const;  // conv2d(x, W), ignoring any extension
  // forward_without_bias(silu(norm(x + shift))) (shift [N, C] or undefined) with the norm applied
  // inside the convolution (conv2d_after_group_norm_silu) where no gradient is recorded and the
  // forward is the base's; undefined otherwise (the caller then runs the norm and the conv).
  Variable forward_after_group_norm_silu(const GroupNorm& norm, const Variable& x, const Variable& shift) const;

  void set_extension(std::shared_ptr<const Conv2dExtension> extension) { extension_ = std::move(extension); }
  const std::shared_ptr<const Conv2dExtension>& extension() const { return extension_; }

  const Variable& weight() const { return weight_; }  // (out, in, kh, kw)
  const Variable& bias() const { return bias_; }      // (out) or undefined
  const Conv2dOptions& options() const { return options_; }
  ops::Conv2dParams params() const {
    return {options_.stride, options_.stride, options_.padding, options_.padding};
  }

 private:
  void check_input(const Variable& x) const;
  Conv2dOptions options_;
  Variable weight_, bias_;
  std::shared_ptr<const Conv2dExtension> extension_;
};

}  // namespace loom::nn
