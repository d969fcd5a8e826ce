#include "unet/diffusion.h"

#include <algorithm>
#include <cmath>

#include "autograd/ops.h"
#include "tensor/ops.h"

namespace loom::unet {

namespace {

// torch.linspace(start, end, steps, dtype=float32) on the CPU: step in float, first half
// counted from start, second half from end.
std::vector<float> linspace_f32(double start, double end, int64_t steps) {
  std::vector<float> v(static_cast<size_t>(steps));
  const float s = float(start), e = float(end);
  if (steps == 1) {
    v[0] = s;
    return v;
  }
  const float step = (e - s) / float(steps - 1);
  const int64_t halfway = steps / 2;
  for (int64_t i = 0; i < steps; ++i)
    v[size_t(i)] = i < halfway ? s + step * float(i) : e - step * float(steps - i - 1);
  return v;
}

std::vector<float> betas_for(const NoiseScheduleConfig& c) {
  const int64_t T = c.num_train_timesteps;
  if (c.beta_schedule == "linear") return linspace_f32(c.beta_start, c.beta_end, T);
  if (c.beta_schedule == "scaled_linear") {
    std::vector<float> v = linspace_f32(std::sqrt(c.beta_start), std::sqrt(c.beta_end), T);
    for (float& b : v) b = b * b;
    return v;
  }
  if (c.beta_schedule == "squaredcos_cap_v2") {  // betas_for_alpha_bar, cosine, max_beta 0.999
    auto alpha_bar = [](double t) {
      const double x = std::cos((t + 0.008) / 1.008 * M_PI / 2);
      return x * x;
    };
    std::vector<float> v(static_cast<size_t>(T));
    for (int64_t i = 0; i < T; ++i) {
      const double t1 = double(i) / double(T), t2 = double(i + 1) / double(T);
      v[size_t(i)] = float(std::min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999));
    }
    return v;
  }
  LOOM_FAIL("noise schedule: beta_schedule \"", c.beta_schedule,
            "\" is not supported (scaled_linear, linear, squaredcos_cap_v2)");
}

}  // namespace

DDPMSchedule::DDPMSchedule(const NoiseScheduleConfig& config) : config_(config) {
  LOOM_CHECK(config.num_train_timesteps >= 1, "noise schedule: num_train_timesteps must be positive, got ",
             config.num_train_timesteps);
  LOOM_CHECK(config.prediction_type == "epsilon" || config.prediction_type == "v_prediction",
             "noise schedule: prediction_type \"", config.prediction_type, "\" is not supported (epsilon, v_prediction)");
  betas_ = betas_for(config);
  alphas_cumprod_.resize(betas_.size());
  double acc = 1.0;  // torch's CPU cumprod accumulates floats in double
  for (size_t i = 0; i < betas_.size(); ++i) {
    acc *= double(1.0f - betas_[i]);
    alphas_cumprod_[i] = float(acc);
  }
}

std::vector<int64_t> DDPMSchedule::indices(const Tensor& timesteps, int64_t batch) const {
  LOOM_CHECK(timesteps.defined() && timesteps.dim() == 1 && timesteps.size(0) == batch,
             "noise schedule: timesteps must be [", batch, "], got ", timesteps.defined() ? timesteps.shape() : Shape{});
  std::vector<int64_t> t;
  for (double v : timesteps.to(Device::cpu()).to(DType::F64).to_vector()) {
    LOOM_CHECK(v == std::floor(v) && v >= 0 && v < double(alphas_cumprod_.size()), "noise schedule: timestep ", v,
               " is not an integer in [0, ", alphas_cumprod_.size(), ")");
    t.push_back(int64_t(v));
  }
  return t;
}

Tensor DDPMSchedule::per_sample(const Tensor& x, const std::vector<int64_t>& t, bool one_minus) const {
  Shape shape(size_t(x.dim()), 1);
  shape[0] = x.size(0);
  // ᾱ_t cast to x's dtype first (diffusers: alphas_cumprod.to(dtype)), then 1 − · and ** 0.5 in that dtype.
  std::vector<double> a;
  for (int64_t i : t) a.push_back(double(alphas_cumprod_[size_t(i)]));
  Tensor v = Tensor::from_values(a, shape, x.dtype(), x.device());
  if (one_minus) v = ops::add_scalar(ops::neg(v), 1.0);
  return ops::sqrt(v);
}

Tensor DDPMSchedule::add_noise(const Tensor& x, const Tensor& noise, const Tensor& timesteps) const {
  LOOM_CHECK(x.shape() == noise.shape(), "add_noise: sample ", x.shape(), " and noise ", noise.shape(), " differ");
  const auto t = indices(timesteps, x.size(0));
  return ops::add(ops::mul(per_sample(x, t, false), x), ops::mul(per_sample(x, t, true), noise));
}

Tensor DDPMSchedule::velocity(const Tensor& x, const Tensor& noise, const Tensor& timesteps) const {
  LOOM_CHECK(x.shape() == noise.shape(), "velocity: sample ", x.shape(), " and noise ", noise.shape(), " differ");
  const auto t = indices(timesteps, x.size(0));
  return ops::sub(ops::mul(per_sample(x, t, false), noise), ops::mul(per_sample(x, t, true), x));
}

Tensor DDPMSchedule::target(const Tensor& x, const Tensor& noise, const Tensor& timesteps) const {
  return config_.prediction_type == "epsilon" ? noise : velocity(x, noise, timesteps);
}

std::vector<double> DDPMSchedule::snr(const Tensor& timesteps, DType precision) const {
  const auto t = indices(timesteps, timesteps.defined() && timesteps.dim() == 1 ? timesteps.size(0) : -1);
  std::vector<double> out;
  for (int64_t i : t) {
    const float a = alphas_cumprod_[size_t(i)];
    if (precision == DType::F64) {
      const double r = std::sqrt(double(a)) / std::sqrt(1.0 - double(a));
      out.push_back(r * r);
      continue;
    }
    const float alpha = std::sqrt(a), sigma = std::sqrt(1.0f - a);
    const float r = alpha / sigma;
    out.push_back(double(r * r));
  }
  return out;
}

std::vector<double> DDPMSchedule::min_snr_weights(const Tensor& timesteps, double gamma, DType precision) const {
  LOOM_CHECK(gamma > 0, "min-SNR weighting: gamma must be positive, got ", gamma);
  const bool epsilon = config_.prediction_type == "epsilon";
  std::vector<double> w;
  for (double s : snr(timesteps, precision)) {
    if (precision == DType::F64) {
      w.push_back(std::min(s, gamma) / (epsilon ? s : s + 1.0));
      continue;
    }
    const float sf = float(s), m = std::min(sf, float(gamma));
    w.push_back(double(epsilon ? m / sf : m / (sf + 1.0f)));
  }
  return w;
}

Variable weighted_mse_loss(const Variable& pred, const Variable& target, const std::vector<double>& weights) {
  if (weights.empty()) return mse_loss(pred, target);
  LOOM_CHECK(pred.defined(), "weighted_mse_loss: undefined prediction");
  return sample_weighted_mse_loss(
      pred, target, Tensor::from_values(weights, {int64_t(weights.size())}, pred.dtype(), pred.device()));
}

Variable sample_weighted_mse_loss(const Variable& pred, const Variable& target, const Tensor& weights) {
  if (!weights.defined()) return mse_loss(pred, target);
  LOOM_CHECK(pred.defined() && target.defined() && pred.shape() == target.shape() && pred.dim() >= 2,
             "weighted_mse_loss: prediction and target must have one shape [N, ...]");
  LOOM_CHECK(weights.dim() == 1 && weights.size(0) == pred.size(0), "weighted_mse_loss: ", weights.shape(),
             " weights for ", pred.size(0), " samples");
  const Variable diff = sub(pred, target);
  std::vector<int64_t> rest;
  for (int64_t d = 1; d < pred.dim(); ++d) rest.push_back(d);
  const Variable per = mean(mul(diff, diff), rest);  // [N]
  return mean(mul(per, Variable(weights)));
}

}  // namespace loom::unet
