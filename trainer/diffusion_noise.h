// The random numbers of the diffusion objective, in one place: each micro-batch's noise,
// noise offset and timesteps are a pure function of (seed, micro-batch number), so a run is
// deterministic for a seed and a resume redraws exactly what the uninterrupted run drew,
// without saving any generator state. The numbers come from the counter-based generator of
// tensor/random.h (Philox4x32-10), drawn on the training device; CPU and CUDA give the same bits,
// so a run's draws do not depend on the device either.
#pragma once

#include <cstdint>

#include "tensor/tensor.h"

namespace loom::trainer {

struct DiffusionDraw {
  Tensor noise;      // `shape`, f32 on `device`: N(0,1), plus offset · N(0,1) per (sample, channel)
  Tensor timesteps;  // (shape[0],), f64 on the CPU: integers uniform in [0, num_train_timesteps)
};

// shape = (N, C, h, w). noise_offset 0 draws no offset term (diffusers' --noise_offset).
// Counters of one draw (key = f(seed, micro)): noise [0, numel), offset term [numel, numel + N·C),
// timesteps [numel + N·C, … + N).
DiffusionDraw draw_noise(const Shape& shape, int64_t num_train_timesteps, double noise_offset, uint64_t seed,
                         int64_t micro, Device device = Device::cpu());

}  // namespace loom::trainer
