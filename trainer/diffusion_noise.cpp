#include "trainer/diffusion_noise.h"

#include <algorithm>
#include <cmath>

#include "tensor/ops.h"
#include "tensor/random.h"

namespace loom::trainer {

DiffusionDraw draw_noise(const Shape& shape, int64_t num_train_timesteps, double noise_offset, uint64_t seed,
                         int64_t micro, Device device) {
  LOOM_CHECK(shape.size() == 4, "draw_noise: shape must be (N, C, h, w), got ", shape);
  // One Philox key per (seed, micro-batch); neighbouring keys give unrelated streams.
  const uint64_t key = seed * 0x94d049bb133111ebull + uint64_t(micro) * 0x9e3779b97f4a7c15ull + 0x5eed;
  const uint64_t numel = uint64_t(shape_numel(shape)), per_channel = uint64_t(shape[0] * shape[1]);
  DiffusionDraw d;
  d.noise = random_normal(shape, DType::F32, device, key, 0);
  if (noise_offset > 0)
    d.noise = ops::add(d.noise,
                       ops::mul_scalar(random_normal({shape[0], shape[1], 1, 1}, DType::F32, device, key, numel),
                                       noise_offset));
  // Timesteps stay on the host: the schedule's per-sample factors are looked up there.
  const Tensor u = random_uniform({shape[0]}, DType::F64, Device::cpu(), key, numel + per_channel);
  std::vector<double> t = u.to_vector();
  for (double& v : t) v = std::min(std::floor(v * double(num_train_timesteps)), double(num_train_timesteps - 1));
  d.timesteps = Tensor::from_values(t, {shape[0]}, DType::F64);
  return d;
}

}  // namespace loom::trainer
