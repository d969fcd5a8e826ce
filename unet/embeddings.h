// Timestep embeddings of diffusers' UNet2DConditionModel.
//
//   timestep_embedding(t [N], dim, flip_sin_to_cos, downscale_freq_shift) -> [N, dim]
//     diffusers' get_timestep_embedding: half = dim / 2,
//     freq_k = exp(−ln(max_period)·k / (half − shift)), k < half,
//     emb = [sin(t·freq), cos(t·freq)] (cos first when flip_sin_to_cos), zero-padded to an odd dim.
//     Computed on the host in f64 and returned in `dtype` (diffusers computes it in f32 and casts
//     it to the sample's dtype; the f64 golden fixtures patch that function to f64, see
//     tests/unet/fixtures/make_unet_fixtures.py). Not differentiable (t is data). Fractional t allowed.
//   TimestepEmbedding: linear_1 (in → time_embed_dim), act (silu), linear_2 (→ out, default
//     time_embed_dim); parameter names as diffusers'.
#pragma once

#include <string>

#include "nn/linear.h"

namespace loom::unet {

Tensor timestep_embedding(const Tensor& timesteps, int64_t dim, bool flip_sin_to_cos, double downscale_freq_shift,
                          DType dtype, Device device, double scale = 1.0, double max_period = 10000.0);

// "silu" / "swish", "gelu", "relu", "mish" is not supported (an error naming it).
Variable activation(const std::string& name, const Variable& x);
// Throws naming `field` when `name` is not an activation activation() knows.
void check_activation(const std::string& name, const std::string& field);

struct TimestepEmbeddingOptions {
  int64_t in_channels = 0;
  int64_t time_embed_dim = 0;
  int64_t out_dim = 0;  // 0: time_embed_dim
  std::string act_fn = "silu";
};

class TimestepEmbedding : public nn::UnaryModule {
 public:
  TimestepEmbedding(const TimestepEmbeddingOptions& options, Generator& gen = default_generator(),
                    DType dtype = DType::F32, Device device = Device::cpu());
  std::string type_name() const override { return "TimestepEmbedding"; }
  Variable forward(const Variable& sample) const override;  // [N, in] -> [N, out]

 private:
  TimestepEmbeddingOptions options_;
};

}  // namespace loom::unet
