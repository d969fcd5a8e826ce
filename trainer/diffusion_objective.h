// The diffusion objective (SPEC §8): training a LoRA or Custom Diffusion adapter of a whole
// UNet2DConditionModel as diffusers' train_text_to_image_lora(_sdxl).py and
// train_custom_diffusion.py do. Each micro-batch:
//
//   t ~ U{0..T−1}, noise ~ N(0,1) (+ noise_offset · N(0,1) per sample and channel)
//     (taken from the data file instead when it holds `timesteps` / `noise`)
//   noisy  = √ᾱ_t · latents + √(1−ᾱ_t) · noise
//   target = noise (epsilon) | √ᾱ_t · noise − √(1−ᾱ_t) · latents (v_prediction)
//   loss   = mean_n w_n · mean((unet(noisy, t, cond) − target)²),
//            w_n = 1, or min(SNR_t, γ)/SNR_t (epsilon), min(SNR_t, γ)/(SNR_t + 1) (v_prediction)
//
// The rest of the run (adapter, optimizer, schedules, clipping, accumulation, checkpoints,
// exact resume, NaN guard, progress, loss files) is trainer.h's train_with. Adapter keys are
// the whole-UNet module paths (down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q).
#pragma once

#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "trainer/trainer.h"
#include "unet/unet.h"

namespace loom::trainer {

// A diffusion data file in memory, every tensor f32 on the CPU (timesteps f64).
struct DiffusionData {
  Tensor latents;                 // (N, in_channels, h, w), already scaled by the VAE's factor
  Tensor encoder_hidden_states;   // (N, K, cross_attention_dim)
  Tensor encoder_attention_mask;  // (N, K) keep-mask, or undefined
  Tensor text_embeds;             // (N, D) SDXL (addition_embed_type text_time), or undefined
  Tensor time_ids;                // (N, 6) SDXL, or undefined
  Tensor noise;                   // (N, in_channels, h, w), or undefined: drawn from the seed
  Tensor timesteps;               // (N,) integers, or undefined: drawn from the seed
  int64_t size() const { return latents.size(0); }

  // Reads a safetensors or HDF5 file; a missing or mis-ranked tensor, NaN/Inf, or row counts that
  // differ are io::FileErrors naming the file and the tensor.
  static DiffusionData load(const std::string& path);
  // Throws io::FileError naming `path`, the tensor and both sizes where the data does not fit
  // the model (channels, cross_attention_dim, text_embeds width, SDXL tensors missing or
  // unexpected) or the schedule (timesteps not integers in [0, num_train_timesteps)).
  void check_fits(const unet::UNet2DConditionConfig& config, const DiffusionOptions& options,
                  const std::string& path) const;
  DiffusionData rows(const std::vector<int64_t>& indices) const;
};

// One micro-batch with its noise and timesteps. latents / noise set the loss's dtype (f32 in
// training, f64 in the golden tests); the conditioning is cast to the model's dtype.
struct DiffusionBatch {
  Tensor latents, noise, timesteps;
  Tensor encoder_hidden_states, encoder_attention_mask, text_embeds, time_ids;
};

// The loss above (a scalar in the latents' dtype) for `model`, whose activations are
// `model_dtype`; differentiable with respect to the model's (adapter) parameters.
Variable diffusion_loss(const unet::UNet2DConditionModel& model, const unet::DDPMSchedule& schedule,
                        const DiffusionBatch& batch, const std::optional<double>& snr_gamma, DType model_dtype);

// Trains an adapter of `model` on `data` (options.diffusion.enabled must be set; the rest as
// train() in trainer.h, which says what a resume does and what is thrown).
TrainResult train_unet(const std::shared_ptr<unet::UNet2DConditionModel>& model, const DiffusionData& data,
                       const TrainOptions& options, std::ostream& log, const std::string& resume_dir = "");

}  // namespace loom::trainer
