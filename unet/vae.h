// diffusers' AutoencoderKL (the Stable Diffusion VAE, SPEC §8), with diffusers'
// parameter names, built from an AutoencoderKLConfig (unet/vae_config.h):
//
//   encoder.conv_in, encoder.down_blocks.i (DownEncoderBlock2D: resnets.j for j <
//     layers_per_block, downsamplers.0.conv except in the last block: 3×3 stride 2,
//     padding 0 after one zero column right and one zero row below),
//   encoder.mid_block, encoder.conv_norm_out, SiLU, encoder.conv_out (2·latent channels),
//   quant_conv (1×1, when use_quant_conv),
//   post_quant_conv (1×1, when use_post_quant_conv), decoder.conv_in, decoder.mid_block,
//   decoder.up_blocks.i (UpDecoderBlock2D: layers_per_block + 1 resnets, upsamplers.0.conv
//     except in the last block), decoder.conv_norm_out, SiLU, decoder.conv_out.
//
// The mid block (UNetMidBlock2D): resnets.0, attentions.0 (when mid_block_add_attention),
// resnets.1. Its attention is attention::Attention with group_norm (norm_num_groups,
// eps 1e-6) over all C channels, one head of dim C, biased to_q/to_k/to_v, the residual
// connection and rescale_output_factor 1 — diffusers' VAE attention; self-attention over
// the h·w positions, through the default attention backend (flash on the CPU: nothing
// of size (h·w)² is allocated). Resnets: eps 1e-6, no time embedding, act_fn. The
// final activation before each conv_out is SiLU whatever act_fn says (as in diffusers).
//
// encode: image [N, in_channels, H, W] in [−1, 1] -> moments [N, 2·latent, H/f, W/f]
//   (f = 2^(blocks − 1); any H, W work, with ⌈⌉ sizes as diffusers' padding gives them);
// decode: z [N, latent, h, w] (unscaled) -> image [N, out_channels, h·f, w·f].
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "nn/module.h"
#include "tensor/random.h"
#include "unet/unet_io.h"  // ModelLoadOptions, read_model_weights
#include "unet/vae_config.h"

namespace loom::unet {

// UNetMidBlock2D as the VAE uses it (temb none).
class VaeMidBlock : public nn::UnaryModule {
 public:
  VaeMidBlock(int64_t channels, const AutoencoderKLConfig& config, Generator& gen, DType dtype, Device device);
  std::string type_name() const override { return "UNetMidBlock2D"; }
  Variable forward(const Variable& x) const override;
};

// DownEncoderBlock2D: resnets, then the downsampler (when `downsample`).
class DownEncoderBlock2D : public nn::UnaryModule {
 public:
  DownEncoderBlock2D(int64_t in, int64_t out, bool downsample, const AutoencoderKLConfig& config, Generator& gen,
                     DType dtype, Device device);
  std::string type_name() const override { return "DownEncoderBlock2D"; }
  Variable forward(const Variable& x) const override;
};

// UpDecoderBlock2D: layers_per_block + 1 resnets, then the upsampler (when `upsample`).
class UpDecoderBlock2D : public nn::UnaryModule {
 public:
  UpDecoderBlock2D(int64_t in, int64_t out, bool upsample, const AutoencoderKLConfig& config, Generator& gen,
                   DType dtype, Device device);
  std::string type_name() const override { return "UpDecoderBlock2D"; }
  Variable forward(const Variable& x) const override;
};

class VaeEncoder : public nn::UnaryModule {
 public:
  VaeEncoder(const AutoencoderKLConfig& config, Generator& gen, DType dtype, Device device);
  std::string type_name() const override { return "Encoder"; }
  Variable forward(const Variable& x) const override;  // [N, in, H, W] -> [N, 2·latent, H/f, W/f]
};

class VaeDecoder : public nn::UnaryModule {
 public:
  VaeDecoder(const AutoencoderKLConfig& config, Generator& gen, DType dtype, Device device);
  std::string type_name() const override { return "Decoder"; }
  Variable forward(const Variable& z) const override;  // [N, latent, h, w] -> [N, out, h·f, w·f]
};

class AutoencoderKL : public nn::Module {
 public:
  explicit AutoencoderKL(const AutoencoderKLConfig& config, Generator& gen = default_generator(),
                         DType dtype = DType::F32, Device device = Device::cpu());
  std::string type_name() const override { return "AutoencoderKL"; }
  const AutoencoderKLConfig& config() const { return config_; }

  // encoder (+ quant_conv): image [N, in, H, W] -> moments [N, 2·latent, h, w].
  Variable encode(const Variable& image) const;
  // (post_quant_conv +) decoder: z [N, latent, h, w] (unscaled) -> image [N, out, h·f, w·f].
  Variable decode(const Variable& z) const;

 private:
  AutoencoderKLConfig config_;
};

// DiagonalGaussianDistribution(moments): mean = the first half of the channels, logvar =
// the second half clamped to [−30, 20].
struct LatentPosterior {
  Tensor mean, logvar;
  Tensor std() const;  // exp(logvar / 2)
  // mean + std · noise, noise ~ N(0, 1) drawn from `gen` (loom's generator, not torch's).
  Tensor sample(Generator& gen) const;
};
LatentPosterior latent_posterior(const Tensor& moments);

// What the diffusion model sees: (z − shift_factor) · scaling_factor, and back.
Tensor scale_latents(const Tensor& z, const AutoencoderKLConfig& config);
Tensor unscale_latents(const Tensor& latents, const AutoencoderKLConfig& config);

// Renames the keys of diffusers' deprecated VAE attention blocks (…mid_block.attentions.N.
// query / key / value / proj_attn .weight/.bias) to to_q / to_k / to_v / to_out.0, as
// diffusers' _convert_deprecated_attention_blocks does. Returns how many keys it renamed.
int rename_deprecated_attention_keys(std::map<std::string, Tensor>& weights);

using VaeLoadOptions = ModelLoadOptions;  // unet/unet_io.h

struct LoadedVae {
  std::shared_ptr<AutoencoderKL> model;
  std::vector<std::string> weight_files;
  std::vector<std::string> notes;  // config keys ignored, deprecated names renamed, weights without checksums
};

// True when dir/config.json says `"_class_name": "AutoencoderKL"`.
bool is_vae_dir(const std::string& dir);
// A diffusers AutoencoderKL directory: config.json and the weights, found as
// read_model_weights finds them (diffusion_pytorch_model.safetensors, .fp16, sharded,
// model.safetensors, model.h5). Strict: a missing, unexpected or mis-shaped key is an
// io::FileError naming it; a bad config is an io::FileError naming config.json and the key.
LoadedVae load_vae_dir(const std::string& dir, const VaeLoadOptions& options = {});

}  // namespace loom::unet
