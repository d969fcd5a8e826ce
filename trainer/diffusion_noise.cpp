#include "trainer/diffusion_noise.h"

#include <cmath>

#include "tensor/ops.h"
#include "tensor/random.h"

namespace loom::trainer {

DiffusionDraw draw_noise(const Shape& shape, int64_t num_train_timesteps, double noise_offset, uint64_t seed,
                         int64_t micro) {
  LOOM_CHECK(shape.size() == 4, "draw_noise: shape must be (N, C, h, w), got ", shape);
  // One stream per (seed, micro-batch): splitmix64 inside manual_seed decorrelates neighbours.
  Generator gen(seed * 0x94d049bb133111ebull + uint64_t(micro) * 0x9e3779b97f4a7c15ull + 0x5eed);
  DiffusionDraw d;
  std::vector<double> t(static_cast<size_t>(shape[0]));
  for (double& v : t) v = std::floor(gen.uniform() * double(num_train_timesteps));
  d.timesteps = Tensor::from_values(t, {shape[0]}, DType::F64);
  d.noise = Tensor::randn(shape, gen);
  if (noise_offset > 0)
    d.noise = ops::add(d.noise, ops::mul_scalar(Tensor::randn({shape[0], shape[1], 1, 1}, gen), noise_offset));
  return d;
}

}  // namespace loom::trainer
