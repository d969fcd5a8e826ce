// The block types of diffusers' UNet2DConditionModel, with diffusers' names:
//
//   DownBlock2D / CrossAttnDownBlock2D   resnets.i (+ attentions.i), downsamplers.0
//   UNetMidBlock2DCrossAttn              resnets.0, then (attentions.i, resnets.i+1)
//   UpBlock2D / CrossAttnUpBlock2D       resnets.i (+ attentions.i), upsamplers.0
//
// Down blocks return their output and the skip states they produce (one per
// resnet, plus the downsampler's); up blocks consume skip states from the back
// of the list (concatenated along channels before each resnet), as diffusers does.
// Attentions are attention::Transformer2DModel with heads = num_attention_heads
// and head dim = out_channels / num_attention_heads.
#pragma once

#include <string>
#include <vector>

#include "attention/transformer.h"
#include "unet/resnet.h"

namespace loom::unet {

struct BlockOptions {
  std::string type;  // one of the five diffusers class names above
  int64_t num_layers = 1;
  int64_t in_channels = 0, out_channels = 0;
  int64_t prev_output_channel = 0;  // up blocks
  int64_t temb_channels = 0;
  bool add_sample = false;  // add_downsample / add_upsample
  int64_t downsample_padding = 1;
  // resnets
  double resnet_eps = 1e-5;
  std::string act_fn = "silu";
  int64_t resnet_groups = 32;
  double dropout = 0.0;
  std::string time_embedding_norm = "default";
  double output_scale_factor = 1.0;
  // attentions (the CrossAttn types)
  std::vector<int64_t> transformer_layers_per_block;  // one per layer (size num_layers)
  int64_t num_attention_heads = 8;
  int64_t cross_attention_dim = 1280;
  bool use_linear_projection = false;
  bool only_cross_attention = false;
  bool upcast_attention = false;
};

bool is_cross_attention_block(const std::string& type);

// Inputs every block may read.
struct BlockContext {
  Variable temb;                   // [N, temb_channels]
  Variable encoder_hidden_states;  // [N, K, cross_attention_dim]
  Tensor encoder_attention_mask;   // [N, K] keep-mask or undefined
};

class DownBlock : public nn::Module {
 public:
  DownBlock(const BlockOptions& options, Generator& gen, DType dtype, Device device);
  std::string type_name() const override { return options_.type; }
  // Appends the skip states to `skips`; returns the block's output.
  Variable forward(const Variable& x, const BlockContext& ctx, std::vector<Variable>& skips) const;

 private:
  BlockOptions options_;
};

class MidBlock : public nn::Module {
 public:
  MidBlock(const BlockOptions& options, Generator& gen, DType dtype, Device device);
  std::string type_name() const override { return "UNetMidBlock2DCrossAttn"; }
  Variable forward(const Variable& x, const BlockContext& ctx) const;

 private:
  BlockOptions options_;
};

class UpBlock : public nn::Module {
 public:
  UpBlock(const BlockOptions& options, Generator& gen, DType dtype, Device device);
  std::string type_name() const override { return options_.type; }
  // Pops num_layers skip states from the back of `skips`. upsample_h/w 0: 2× upsampling.
  Variable forward(const Variable& x, const BlockContext& ctx, std::vector<Variable>& skips, int64_t upsample_h,
                   int64_t upsample_w) const;
  int64_t num_layers() const { return options_.num_layers; }

 private:
  BlockOptions options_;
};

}  // namespace loom::unet
