// The DDPM training objective of diffusers' text-to-image scripts (SPEC §8):
// the noise schedule of DDPMScheduler, add_noise, the v-prediction target, and
// min-SNR-γ loss weights (diffusers.training_utils.compute_snr and the scripts'
// weighting). Library code only; the trainer wires it in.
//
// Schedule numbers follow diffusers exactly: betas in f32 (torch.linspace's
// symmetric formula; squaredcos_cap_v2 through betas_for_alpha_bar in f64, then
// f32), alphas = 1 − betas in f32, alphas_cumprod = cumprod with a double
// accumulator stored in f32 (torch's CPU cumprod). Per-sample factors
// √ᾱ_t and √(1 − ᾱ_t) are taken in the sample's dtype from those f32 values,
// as add_noise / get_velocity do.
#pragma once

#include <string>
#include <vector>

#include "autograd/variable.h"

namespace loom::unet {

struct NoiseScheduleConfig {
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.00085;
  double beta_end = 0.012;
  std::string beta_schedule = "scaled_linear";  // scaled_linear | linear | squaredcos_cap_v2
  std::string prediction_type = "epsilon";      // epsilon | v_prediction
};

class DDPMSchedule {
 public:
  explicit DDPMSchedule(const NoiseScheduleConfig& config = {});
  const NoiseScheduleConfig& config() const { return config_; }
  const std::vector<float>& betas() const { return betas_; }
  const std::vector<float>& alphas_cumprod() const { return alphas_cumprod_; }

  // x [N, ...], noise like x, timesteps [N] (integers, any dtype): √ᾱ_t·x + √(1−ᾱ_t)·noise.
  Tensor add_noise(const Tensor& x, const Tensor& noise, const Tensor& timesteps) const;
  // √ᾱ_t·noise − √(1−ᾱ_t)·x (diffusers' get_velocity).
  Tensor velocity(const Tensor& x, const Tensor& noise, const Tensor& timesteps) const;
  // The training target for the configured prediction_type: noise or the velocity.
  Tensor target(const Tensor& x, const Tensor& noise, const Tensor& timesteps) const;
  // SNR(t) = ᾱ_t / (1 − ᾱ_t), computed in f32 as compute_snr does ((√ᾱ_t / √(1−ᾱ_t))², from the f32
  // ᾱ_t); with `precision` F64 the same formula in f64 (for an f64 loss: the golden tests).
  std::vector<double> snr(const Tensor& timesteps, DType precision = DType::F32) const;
  // min(SNR, γ) / SNR for epsilon, min(SNR, γ) / (SNR + 1) for v_prediction, in `precision` (f32 or f64).
  std::vector<double> min_snr_weights(const Tensor& timesteps, double gamma, DType precision = DType::F32) const;

 private:
  NoiseScheduleConfig config_;
  std::vector<float> betas_, alphas_cumprod_;
  std::vector<int64_t> indices(const Tensor& timesteps, int64_t batch) const;
  // [N, 1, 1, ...] of f(ᾱ_t) in x's dtype, broadcastable against x.
  Tensor per_sample(const Tensor& x, const std::vector<int64_t>& t, bool one_minus) const;
};

// mean over samples of w_n · mean over the rest of (pred − target)², w [N] (the scripts'
// min-SNR loss); the plain MSE when w is empty.
Variable weighted_mse_loss(const Variable& pred, const Variable& target, const std::vector<double>& weights);
// The same with the weights as a tensor [N] in pred's dtype on pred's device (undefined: plain
// MSE), so that nothing of the loss is on the host (a CUDA graph capture).
Variable sample_weighted_mse_loss(const Variable& pred, const Variable& target, const Tensor& weights);

}  // namespace loom::unet
