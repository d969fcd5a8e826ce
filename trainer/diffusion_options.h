// The options of the diffusion objective (SPEC §8: `loom train --model UNET_DIR`): the DDPM
// noise schedule, the prediction type, min-SNR-γ weighting and the noise offset. Part of
// TrainOptions (saved in checkpoints, so that a resume continues with them).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "unet/diffusion.h"

namespace loom::trainer {

struct DiffusionOptions {
  bool enabled = false;             // a UNet run (false: the MSE-to-target objective of a block)
  unet::NoiseScheduleConfig schedule;  // Stable Diffusion's values by default
  std::optional<double> snr_gamma;  // min-SNR-γ weighting (none: plain MSE)
  double noise_offset = 0.0;        // noise += noise_offset · N(0,1) per sample and channel

  std::string to_json() const;
  static DiffusionOptions from_json(const std::string& text);
  void validate() const;  // throws naming the flag (--beta-schedule, --snr-gamma, …)
};

}  // namespace loom::trainer
