// diffusers' UNet2DConditionModel (SPEC §8): conv_in, the time embedding (and
// SDXL's text_time added embedding), down blocks, mid block, up blocks with skip
// connections, conv_norm_out / conv_act / conv_out — built from a
// UNet2DConditionConfig, with diffusers' parameter names, so a
// diffusion_pytorch_model.safetensors loads with a strict load_state_dict.
//
// forward:
//   sample [N, in_channels, h, w] (any h, w: where they are not multiples of
//     2^(number of upsamplers), each upsampler takes its skip's size, as diffusers does)
//   timestep [N], [1] or [] (fractional values allowed; any dtype)
//   encoder_hidden_states [N, K, cross_attention_dim]
//   encoder_attention_mask [N, K] keep-mask (1 keep, 0 drop) or undefined
//   text_embeds [N, D], time_ids [N, 6] (addition_embed_type "text_time" only)
//   -> prediction [N, out_channels, h, w]
// The sinusoidal projections of timestep and time_ids are computed on the host. A caller that
// must not have host work inside the forward (a CUDA graph capture) computes them ahead with
// project_timesteps() and passes them as timestep_proj / time_ids_proj: the forward then uses
// them instead of timestep / time_ids, with the same numbers.
#pragma once

#include <string>
#include <vector>

#include "nn/conv.h"
#include "unet/blocks.h"
#include "unet/config.h"
#include "unet/embeddings.h"

namespace loom::unet {

struct UNetInputs {
  Variable sample;
  Tensor timestep;
  Variable encoder_hidden_states;
  Tensor encoder_attention_mask;
  Variable text_embeds;
  Tensor time_ids;
  Tensor timestep_proj;  // [N, block_out_channels[0]] (project_timesteps), or undefined
  Tensor time_ids_proj;  // [N, 6·addition_time_embed_dim] (text_time only), or undefined
};

class UNet2DConditionModel : public nn::Module {
 public:
  explicit UNet2DConditionModel(const UNet2DConditionConfig& config, Generator& gen = default_generator(),
                                DType dtype = DType::F32, Device device = Device::cpu());
  std::string type_name() const override { return "UNet2DConditionModel"; }

  Variable forward(const UNetInputs& in) const;
  const UNet2DConditionConfig& config() const { return config_; }
  int64_t num_upsamplers() const { return num_upsamplers_; }

  // Sets in.timestep_proj (and, for text_time, in.time_ids_proj) from in.timestep / in.time_ids,
  // in `dtype` on `device`, for a batch of `batch` samples.
  void project_timesteps(UNetInputs& in, int64_t batch, DType dtype, Device device) const;

  // The embedding every resnet receives: time_embedding(sinusoid(t)) (+ add_embedding for text_time).
  Variable time_embedding(const Tensor& timesteps, int64_t batch, const UNetInputs& in, DType dtype,
                          Device device) const;

 private:
  UNet2DConditionConfig config_;
  int64_t num_upsamplers_ = 0;
};

}  // namespace loom::unet
