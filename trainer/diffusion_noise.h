// The random numbers of the diffusion objective, in one place: each micro-batch's noise,
// noise offset and timesteps are a pure function of (seed, micro-batch number), so a run is
// deterministic for a seed and a resume redraws exactly what the uninterrupted run drew,
// without saving any generator state. (The counter-based device generator of tensor/random.h
// plugs in here.)
#pragma once

#include <cstdint>

#include "tensor/tensor.h"

namespace loom::trainer {

struct DiffusionDraw {
  Tensor noise;      // `shape`, f32 on the CPU: N(0,1), plus offset · N(0,1) per (sample, channel)
  Tensor timesteps;  // (shape[0],), f64 on the CPU: integers uniform in [0, num_train_timesteps)
};

// shape = (N, C, h, w). noise_offset 0 draws no offset term (diffusers' --noise_offset).
DiffusionDraw draw_noise(const Shape& shape, int64_t num_train_timesteps, double noise_offset, uint64_t seed,
                         int64_t micro);

}  // namespace loom::trainer
