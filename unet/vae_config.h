// config.json of diffusers' AutoencoderKL (the Stable Diffusion VAE), read as
// diffusers 0.42 reads it.
//
// Fields and defaults (diffusers'): in_channels 3, out_channels 3,
// down_block_types ["DownEncoderBlock2D"], up_block_types ["UpDecoderBlock2D"],
// block_out_channels [64], layers_per_block 1, act_fn "silu", latent_channels 4,
// norm_num_groups 32, sample_size 32 (an int or a list; only tiling reads it),
// scaling_factor 0.18215, shift_factor null, latents_mean / latents_std null,
// force_upcast true, use_quant_conv true, use_post_quant_conv true,
// mid_block_add_attention true.
//
// Errors name the key: block types other than DownEncoderBlock2D / UpDecoderBlock2D,
// block lists of different lengths, channels not divisible by norm_num_groups, an
// unknown activation, scaling_factor 0, latents_mean / latents_std that are not null
// (loom applies only scaling_factor and shift_factor), a _class_name other than
// AutoencoderKL. Unknown keys are kept as notes.
#pragma once

#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace loom::unet {

struct AutoencoderKLConfig {
  int64_t in_channels = 3, out_channels = 3;
  std::vector<std::string> down_block_types{"DownEncoderBlock2D"};
  std::vector<std::string> up_block_types{"UpDecoderBlock2D"};
  std::vector<int64_t> block_out_channels{64};
  int64_t layers_per_block = 1;
  std::string act_fn = "silu";
  int64_t latent_channels = 4;
  int64_t norm_num_groups = 32;
  double scaling_factor = 0.18215;
  double shift_factor = 0.0;  // null in the file reads as 0 (no shift)
  bool has_shift_factor = false;
  bool force_upcast = true;
  bool use_quant_conv = true, use_post_quant_conv = true;
  bool mid_block_add_attention = true;
  std::vector<std::string> notes;  // ignored keys, one note each

  // The encoder's total downsampling: 2^(number of blocks − 1) (8 for Stable Diffusion's VAE).
  int64_t downsampling_factor() const { return int64_t(1) << (block_out_channels.size() - 1); }

  static AutoencoderKLConfig from_json_text(const std::string& text, const std::string& source = "config.json");
  static AutoencoderKLConfig from_file(const std::string& path);
};

}  // namespace loom::unet
