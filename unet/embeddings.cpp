#include "unet/embeddings.h"

#include <cmath>
#include <vector>

#include "autograd/ops.h"

namespace loom::unet {

Tensor timestep_embedding(const Tensor& timesteps, int64_t dim, bool flip_sin_to_cos, double downscale_freq_shift,
                          DType dtype, Device device, double scale, double max_period) {
  LOOM_CHECK(timesteps.defined() && timesteps.dim() == 1, "timestep_embedding: timesteps must be 1-D [N], got ",
             timesteps.defined() ? timesteps.shape() : Shape{});
  LOOM_CHECK(dim >= 2, "timestep_embedding: embedding dim must be at least 2, got ", dim);
  const int64_t n = timesteps.size(0), half = dim / 2;
  LOOM_CHECK(double(half) != downscale_freq_shift, "timestep_embedding: half dim ", half,
             " equals downscale_freq_shift (division by zero)");
  const std::vector<double> t = timesteps.to(Device::cpu()).to(DType::F64).to_vector();
  std::vector<double> out(size_t(n * dim), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = 0; k < half; ++k) {
      const double freq = std::exp(-std::log(max_period) * double(k) / (double(half) - downscale_freq_shift));
      const double arg = scale * (t[size_t(i)] * freq);  // diffusers: scale · (t · freq)
      const int64_t sin_at = flip_sin_to_cos ? half + k : k, cos_at = flip_sin_to_cos ? k : half + k;
      out[size_t(i * dim + sin_at)] = std::sin(arg);
      out[size_t(i * dim + cos_at)] = std::cos(arg);
    }
  }
  return Tensor::from_values(out, {n, dim}, dtype, device);
}

void check_activation(const std::string& name, const std::string& field) {
  LOOM_CHECK(name == "silu" || name == "swish" || name == "gelu" || name == "relu", field, ": activation \"", name,
             "\" is not supported (silu, swish, gelu, relu)");
}

Variable activation(const std::string& name, const Variable& x) {
  if (name == "silu" || name == "swish") return silu(x);
  if (name == "gelu") return gelu(x);
  if (name == "relu") return relu(x);
  LOOM_FAIL("activation \"", name, "\" is not supported (silu, swish, gelu, relu)");
}

TimestepEmbedding::TimestepEmbedding(const TimestepEmbeddingOptions& o, Generator& gen, DType dtype, Device device)
    : options_(o) {
  check_activation(o.act_fn, "TimestepEmbedding act_fn");
  const int64_t out = o.out_dim > 0 ? o.out_dim : o.time_embed_dim;
  register_module("linear_1", std::make_shared<nn::Linear>(o.in_channels, o.time_embed_dim, true, gen, dtype, device));
  register_module("linear_2", std::make_shared<nn::Linear>(o.time_embed_dim, out, true, gen, dtype, device));
}

Variable TimestepEmbedding::forward(const Variable& sample) const {
  const Variable h = activation(options_.act_fn, child_as<nn::Linear>("linear_1")->forward(sample));
  return child_as<nn::Linear>("linear_2")->forward(h);
}

}  // namespace loom::unet
