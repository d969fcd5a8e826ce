// diffusers' ResnetBlock2D, Downsample2D and Upsample2D (the convolutional
// pieces of UNet2DConditionModel), with diffusers' parameter names.
//
// ResnetBlock2D (x [N, in, H, W], temb [N, temb_channels] or undefined):
//   h = conv1(act(norm1(x)))
//   temb = time_emb_proj(act(temb))[:, :, None, None]
//   "default":     h = norm2(h + temb)
//   "scale_shift": h = norm2(h) · (1 + scale) + shift   (scale, shift = temb split in two)
//   h = conv2(dropout(act(h)))
//   out = (conv_shortcut(x) or x + h) / output_scale_factor
//   conv_shortcut (1×1) exists when use_in_shortcut (default: in != out).
// Downsample2D: conv (3×3, stride 2, padding 1): [N, C, H, W] -> [N, out, ⌈H/2⌉, ⌈W/2⌉].
// Upsample2D: nearest 2× (or to a given size, as diffusers does when the skip
// connection's size differs), then conv (3×3, padding 1).
#pragma once

#include <optional>
#include <string>

#include "nn/conv.h"
#include "nn/norm.h"

namespace loom::unet {

struct ResnetBlock2DOptions {
  int64_t in_channels = 0;
  int64_t out_channels = 0;     // 0: in_channels
  int64_t temb_channels = 512;  // 0: no time_emb_proj
  int64_t groups = 32;
  int64_t groups_out = 0;       // 0: groups
  double eps = 1e-6;
  double dropout = 0.0;
  std::string time_embedding_norm = "default";  // default | scale_shift
  std::string non_linearity = "swish";
  double output_scale_factor = 1.0;
  std::optional<bool> use_in_shortcut;  // default: in != out
  bool conv_shortcut_bias = true;
};

// A convolution's output with its bias left for the caller to add in a later pass (bias undefined
// when there is none), or, for an extension that cannot leave the bias out, its whole forward and
// no bias (ResnetBlock2D's passes; unet/resnet.cpp).
struct ConvWithoutBias {
  Variable y, bias;
};

class ResnetBlock2D : public nn::Module {
 public:
  ResnetBlock2D(const ResnetBlock2DOptions& options, Generator& gen = default_generator(), DType dtype = DType::F32,
                Device device = Device::cpu());
  std::string type_name() const override { return "ResnetBlock2D"; }
  Variable forward(const Variable& x, const Variable& temb = Variable()) const;
  const ResnetBlock2DOptions& options() const { return options_; }

 private:
  // activation(norm2(conv1 output + conv1's bias, with the time embedding t [N, C] / [N, 2C])).
  Variable norm2_with_time(const Variable& conv1_y, const Variable& conv1_bias, const Variable& t) const;
  // conv2(dropout(norm2_with_time(...))) without conv2's bias: norm2 + SiLU inside conv2 where the
  // layers allow (no dropout, "default" time embedding; conv2d_after_group_norm_silu).
  ConvWithoutBias conv2_after_norm2(const Variable& conv1_y, const Variable& conv1_bias, const Variable& t) const;
  // conv2's output + its bias + shortcut(x), the shortcut's bias included, as one pass.
  Variable exit(const ConvWithoutBias& c2, const Variable& x) const;

  ResnetBlock2DOptions options_;
};

class Downsample2D : public nn::UnaryModule {
 public:
  // padding 1 (diffusers' downsample_padding default); padding 0 pads right/bottom by one first.
  Downsample2D(int64_t channels, int64_t out_channels, int64_t padding = 1, Generator& gen = default_generator(),
               DType dtype = DType::F32, Device device = Device::cpu());
  std::string type_name() const override { return "Downsample2D"; }
  Variable forward(const Variable& x) const override;

 private:
  int64_t padding_;
};

class Upsample2D : public nn::Module {
 public:
  Upsample2D(int64_t channels, int64_t out_channels, Generator& gen = default_generator(), DType dtype = DType::F32,
             Device device = Device::cpu());
  std::string type_name() const override { return "Upsample2D"; }
  // out_h, out_w 0: twice the input's size.
  Variable forward(const Variable& x, int64_t out_h = 0, int64_t out_w = 0) const;
};

}  // namespace loom::unet
