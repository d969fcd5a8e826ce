#include "unet/resnet.h"

#include "nn/linear.h"
#include "unet/embeddings.h"

namespace loom::unet {

namespace {
// activation(norm(x + shift)), shift [N, C] broadcast over positions or undefined; a GroupNorm
// followed by SiLU runs as one pass where no gradient is recorded (nn::GroupNorm::forward_silu).
Variable norm_then_activation(const nn::UnaryModule& norm, const std::string& act, const Variable& x,
                              const Variable& shift = Variable()) {
  const auto* gn = dynamic_cast<const nn::GroupNorm*>(&norm);
  if (gn && (act == "silu" || act == "swish")) return gn->forward_silu(x, shift);
  const Variable u = shift.defined() ? add(x, reshape(shift, {shift.size(0), shift.size(1), 1, 1})) : x;
  return activation(act, norm.forward(u));
}

// conv's forward with its bias left out where the layer can (ConvWithoutBias).
ConvWithoutBias conv_without_bias(const nn::Conv2d& conv, const Variable& x) {
  Variable y = conv.forward_without_bias(x);
  if (y.defined()) return {std::move(y), conv.bias()};
  return {conv.forward(x), Variable()};
}

// conv(activation(norm(x + shift))) without conv's bias (as conv_without_bias): a GroupNorm + SiLU
// is applied inside the convolution where the layer can (Conv2d::forward_after_group_norm_silu),
// with no normed copy of x written.
ConvWithoutBias conv_after_norm(const nn::UnaryModule& norm, const std::string& act, const nn::Conv2d& conv,
                                const Variable& x, const Variable& shift = Variable()) {
  const auto* gn = dynamic_cast<const nn::GroupNorm*>(&norm);
  if (gn && (act == "silu" || act == "swish")) {
    Variable y = conv.forward_after_group_norm_silu(*gn, x, shift);
    if (y.defined()) return {std::move(y), conv.bias()};
  }
  return conv_without_bias(conv, norm_then_activation(norm, act, x, shift));
}

// a + b where either may be undefined (undefined when both are).
Variable add_defined(const Variable& a, const Variable& b) {
  if (!a.defined()) return b;
  if (!b.defined()) return a;
  return add(a, b);
}
}  // namespace

ResnetBlock2D::ResnetBlock2D(const ResnetBlock2DOptions& o, Generator& gen, DType dtype, Device device)
    : options_(o) {
  auto& opt = options_;
  if (opt.out_channels == 0) opt.out_channels = opt.in_channels;
  if (opt.groups_out == 0) opt.groups_out = opt.groups;
  LOOM_CHECK(opt.time_embedding_norm == "default" || opt.time_embedding_norm == "scale_shift",
             "ResnetBlock2D: time_embedding_norm \"", opt.time_embedding_norm,
             "\" is not supported (default, scale_shift)");
  check_activation(opt.non_linearity, "ResnetBlock2D non_linearity");
  LOOM_CHECK(opt.output_scale_factor != 0.0, "ResnetBlock2D: output_scale_factor must not be 0");
  const int64_t in = opt.in_channels, out = opt.out_channels;
  register_module("norm1", std::make_shared<nn::GroupNorm>(opt.groups, in, opt.eps, true, dtype, device));
  register_module("conv1", std::make_shared<nn::Conv2d>(in, out, 3, 1, 1, true, gen, dtype, device));
  if (opt.temb_channels > 0) {
    const int64_t proj = opt.time_embedding_norm == "scale_shift" ? 2 * out : out;
    register_module("time_emb_proj", std::make_shared<nn::Linear>(opt.temb_channels, proj, true, gen, dtype, device));
  }
  register_module("norm2", std::make_shared<nn::GroupNorm>(opt.groups_out, out, opt.eps, true, dtype, device));
  register_module("dropout", std::make_shared<nn::Dropout>(opt.dropout));
  register_module("conv2", std::make_shared<nn::Conv2d>(out, out, 3, 1, 1, true, gen, dtype, device));
  if (opt.use_in_shortcut.value_or(in != out))
    register_module("conv_shortcut",
                    std::make_shared<nn::Conv2d>(in, out, 1, 1, 0, opt.conv_shortcut_bias, gen, dtype, device));
}

Variable ResnetBlock2D::forward(const Variable& x, const Variable& temb) const {
  const auto& o = options_;
  LOOM_CHECK(x.defined() && x.dim() == 4 && x.size(1) == o.in_channels, "ResnetBlock2D: expected input [N, ",
             o.in_channels, ", H, W], got ", x.defined() ? x.shape() : Shape{});
  // The convolutions' biases ride in later passes: conv1's (with the time embedding) in norm2's
  // shift, conv2's and conv_shortcut's in the exit's bias_residual: 3 passes over the activation
  // fewer than conv, bias add, embedding add, conv, bias add, shortcut add.
  const ConvWithoutBias c1 =
      conv_after_norm(*child_as<nn::UnaryModule>("norm1"), o.non_linearity, *child_as<nn::Conv2d>("conv1"), x);
  Variable t;  // [N, C] (scale_shift: [N, 2C])
  if (temb.defined() && find_module("time_emb_proj"))
    t = child_as<nn::Linear>("time_emb_proj")->forward(activation(o.non_linearity, temb));
  Variable out = exit(conv2_after_norm2(c1.y, c1.bias, t), x);
  if (o.output_scale_factor != 1.0) out = mul_scalar(out, 1.0 / o.output_scale_factor);
  return out;
}

Variable ResnetBlock2D::norm2_with_time(const Variable& conv1_y, const Variable& conv1_bias, const Variable& t) const {
  const auto& o = options_;
  const auto norm2 = child_as<nn::UnaryModule>("norm2");
  if (o.time_embedding_norm == "default" && t.defined())  // bias + t as norm2's shift [N, C]
    return norm_then_activation(*norm2, o.non_linearity, conv1_y, add_defined(t, conv1_bias));
  const Variable h =
      conv1_bias.defined() ? add(conv1_y, reshape(conv1_bias, {1, conv1_bias.size(0), 1, 1})) : conv1_y;
  if (o.time_embedding_norm == "default") return norm_then_activation(*norm2, o.non_linearity, h);
  Variable y = norm2->forward(h);
  if (t.defined()) {
    const auto parts = chunk(reshape(t, {t.size(0), t.size(1), 1, 1}), 2, 1);  // scale, shift
    y = add(mul(y, add_scalar(parts[0], 1.0)), parts[1]);
  }
  return activation(o.non_linearity, y);
}

ConvWithoutBias ResnetBlock2D::conv2_after_norm2(const Variable& conv1_y, const Variable& conv1_bias,
                                                  const Variable& t) const {
  const auto& o = options_;
  const auto& conv2 = *child_as<nn::Conv2d>("conv2");
  const auto& dropout = *child_as<nn::Dropout>("dropout");
  if (o.time_embedding_norm == "default" && t.defined() && (!dropout.is_training() || dropout.p() == 0.0))
    return conv_after_norm(*child_as<nn::UnaryModule>("norm2"), o.non_linearity, conv2, conv1_y,
                           add_defined(t, conv1_bias));  // bias + t as norm2's shift [N, C]
  return conv_without_bias(conv2, dropout.forward(norm2_with_time(conv1_y, conv1_bias, t)));
}

Variable ResnetBlock2D::exit(const ConvWithoutBias& c2, const Variable& x) const {
  Variable shortcut = x, bias = c2.bias;
  if (find_module("conv_shortcut")) {
    const ConvWithoutBias cs = conv_without_bias(*child_as<nn::Conv2d>("conv_shortcut"), x);
    shortcut = cs.y;
    bias = add_defined(bias, cs.bias);
  }
  return bias_residual(c2.y, bias, shortcut, 1);  // (conv2 + biases) + shortcut, one pass
}

Downsample2D::Downsample2D(int64_t channels, int64_t out_channels, int64_t padding, Generator& gen, DType dtype,
                           Device device)
    : padding_(padding) {
  LOOM_CHECK(padding == 0 || padding == 1, "Downsample2D: padding ", padding, " is not supported (0 or 1)");
  register_module("conv", std::make_shared<nn::Conv2d>(channels, out_channels, 3, 2, padding, true, gen, dtype, device));
}

Variable Downsample2D::forward(const Variable& x) const {
  Variable h = x;
  if (padding_ == 0) {  // diffusers: F.pad(x, (0, 1, 0, 1)) — one zero column right, one zero row below
    LOOM_CHECK(x.defined() && x.dim() == 4, "Downsample2D: expected [N, C, H, W], got ",
               x.defined() ? x.shape() : Shape{});
    const int64_t n = x.size(0), c = x.size(1), hh = x.size(2), w = x.size(3);
    const Variable col(Tensor::zeros({n, c, hh, 1}, x.dtype(), x.device()));
    h = cat({h, col}, 3);
    const Variable row(Tensor::zeros({n, c, 1, w + 1}, x.dtype(), x.device()));
    h = cat({h, row}, 2);
  }
  return child_as<nn::UnaryModule>("conv")->forward(h);
}

Upsample2D::Upsample2D(int64_t channels, int64_t out_channels, Generator& gen, DType dtype, Device device) {
  register_module("conv", std::make_shared<nn::Conv2d>(channels, out_channels, 3, 1, 1, true, gen, dtype, device));
}

Variable Upsample2D::forward(const Variable& x, int64_t out_h, int64_t out_w) const {
  LOOM_CHECK(x.defined() && x.dim() == 4, "Upsample2D: expected [N, C, H, W], got ", x.defined() ? x.shape() : Shape{});
  if (out_h == 0) out_h = 2 * x.size(2);
  if (out_w == 0) out_w = 2 * x.size(3);
  return child_as<nn::UnaryModule>("conv")->forward(interpolate_nearest(x, out_h, out_w));
}

}  // namespace loom::unet
