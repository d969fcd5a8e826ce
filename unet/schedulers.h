// The samplers of `loom sample` (SPEC §8), as diffusers 0.42 computes them:
//   DDIMScheduler (eta 0)                       kind "ddim"
//   EulerDiscreteScheduler                      kind "euler"
//   DPMSolverMultistepScheduler (dpmsolver++,   kind "dpmpp_2m"
//     solver_order 2, midpoint or heun)
//
// Numbers follow diffusers to the bit where diffusers rounds: alphas_cumprod and sigmas
// are f32 (DDPMSchedule's f32 tables; sigmas = sqrt((1 − ᾱ)/ᾱ) in f32, interpolated at the
// timesteps in f64 as np.interp does, then f32); the per-step scalar coefficients
// (√ᾱ_t, σ, α_t = 1/√(σ²+1), λ = log α − log σ, h, r0, e^{−h} − 1, …) are f32 values
// computed in f32 in diffusers' order; they then multiply the sample in the sample's dtype
// (f32, or f64 for exact comparisons). Timesteps are computed as numpy computes them
// (linspace, arange's fill rule, round half to even).
//
// Configuration: SchedulerConfig holds the keys of diffusers' scheduler_config.json that
// these classes read. `from_json_text` starts from the chosen class's own defaults (as
// diffusers' XScheduler.from_config(file) does: keys that were defaults of the file's class
// are not carried over) and applies the file's keys; a value loom does not implement is an
// Error naming the key, the value and what loom supports; keys the class does not read
// become notes. The default for `loom sample` is Stable Diffusion 1.5's scheduler_config.json
// with timestep_spacing "leading" (SPEC §8).
//
// Use (diffusers' pipeline loop):
//   auto s = make_scheduler(SchedulerKind::Euler, SchedulerConfig::stable_diffusion_v1_5(SchedulerKind::Euler));
//   s->set_timesteps(30);
//   x = noise · s->init_noise_sigma();
//   for i in 0..s->num_steps(): x = s->step(guided_unet(s->scale_model_input(x, i), s->timesteps()[i]), i, x);
#pragma once

#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "unet/diffusion.h"

namespace loom::unet {

enum class SchedulerKind { DDIM, Euler, DPMSolverMultistep };

// "ddim" | "euler" | "dpmpp_2m" (Error naming the name and the choices otherwise).
SchedulerKind parse_scheduler_kind(const std::string& name);
const char* scheduler_name(SchedulerKind kind);        // "ddim", "euler", "dpmpp_2m"
const char* scheduler_class_name(SchedulerKind kind);  // "DDIMScheduler", …

struct SchedulerConfig {
  SchedulerKind kind = SchedulerKind::DDIM;
  // num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type (epsilon | v_prediction)
  NoiseScheduleConfig noise;
  std::string timestep_spacing = "leading";  // leading | trailing | linspace
  int64_t steps_offset = 0;
  // DDIM
  bool set_alpha_to_one = true;
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  // Euler and DPM-Solver: the sigma after the last step, "zero" or "sigma_min" (√((1−ᾱ₀)/ᾱ₀))
  std::string final_sigmas_type = "zero";
  // DPM-Solver
  int64_t solver_order = 2;                 // 1 or 2
  std::string solver_type = "midpoint";     // midpoint | heun
  bool lower_order_final = true;
  bool euler_at_final = false;
  double lambda_min_clipped = -std::numeric_limits<double>::infinity();

  std::vector<std::string> notes;  // keys read but not used, the file's class, remapped values

  // diffusers' defaults of the class (XScheduler() with no arguments).
  static SchedulerConfig defaults(SchedulerKind kind);
  // SPEC §8's default: SD 1.5's scheduler_config.json (scaled_linear 0.00085–0.012 over 1000 steps,
  // steps_offset 1, set_alpha_to_one false, clip_sample false) with timestep_spacing "leading".
  static SchedulerConfig stable_diffusion_v1_5(SchedulerKind kind);
  // XScheduler.from_config(text): the class defaults, then the keys of the JSON object `text`.
  // `source` names the file in errors and notes.
  static SchedulerConfig from_json_text(const std::string& text, SchedulerKind kind,
                                        const std::string& source = "scheduler_config.json");
  // The same for a file (io::FileError when it cannot be read).
  static SchedulerConfig from_file(const std::string& path, SchedulerKind kind);
};

// One sampler. set_timesteps first; then step(·, i, ·) for i = 0, 1, … in order.
class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);
  virtual ~Scheduler() = default;
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  const SchedulerConfig& config() const { return config_; }
  const DDPMSchedule& schedule() const { return schedule_; }

  // diffusers' set_timesteps(num_inference_steps): the timesteps (and sigmas), solver state reset.
  // Error when num_inference_steps < 1 or (DDIM) above num_train_timesteps.
  virtual void set_timesteps(int64_t num_inference_steps) = 0;
  // The UNet's timestep at each step: integers for DDIM and DPM-Solver, f32 values for Euler
  // (fractional with "linspace"). Their count is the number of steps (trailing spacing can give
  // one more than asked, as in diffusers).
  const std::vector<double>& timesteps() const { return timesteps_; }
  int64_t num_steps() const { return int64_t(timesteps_.size()); }
  // Euler and DPM-Solver: σ at each step and the final σ (num_steps() + 1 values); empty for DDIM.
  const std::vector<float>& sigmas() const { return sigmas_; }
  // What the starting noise is multiplied by (Euler: max σ, or √(max σ² + 1) for "leading"; else 1).
  virtual double init_noise_sigma() const { return 1.0; }
  // The UNet's input at step i (Euler: sample / √(σ_i² + 1); the others: sample itself).
  virtual Tensor scale_model_input(const Tensor& sample, int64_t step) const;
  // The sample for step i + 1 from the (guided) model output at step i; sample [N, C, h, w]
  // (any shape), model_output of the same shape and dtype. Error when steps come out of order.
  virtual Tensor step(const Tensor& model_output, int64_t step, const Tensor& sample) = 0;

 protected:
  void check_step(int64_t step, const Tensor& model_output, const Tensor& sample) const;
  SchedulerConfig config_;
  DDPMSchedule schedule_;
  int64_t num_inference_steps_ = 0;  // as passed to set_timesteps
  std::vector<double> timesteps_;
  std::vector<float> sigmas_;
};

class DDIMScheduler : public Scheduler {
 public:
  explicit DDIMScheduler(const SchedulerConfig& config);
  void set_timesteps(int64_t num_inference_steps) override;
  Tensor step(const Tensor& model_output, int64_t step, const Tensor& sample) override;
};

class EulerDiscreteScheduler : public Scheduler {
 public:
  explicit EulerDiscreteScheduler(const SchedulerConfig& config);
  void set_timesteps(int64_t num_inference_steps) override;
  double init_noise_sigma() const override;
  Tensor scale_model_input(const Tensor& sample, int64_t step) const override;
  Tensor step(const Tensor& model_output, int64_t step, const Tensor& sample) override;
};

class DPMSolverMultistepScheduler : public Scheduler {
 public:
  explicit DPMSolverMultistepScheduler(const SchedulerConfig& config);
  void set_timesteps(int64_t num_inference_steps) override;
  Tensor step(const Tensor& model_output, int64_t step, const Tensor& sample) override;

 private:
  Tensor previous_x0_;        // the data prediction of the previous step (the multistep memory)
  int64_t lower_order_nums_ = 0;
  int64_t next_step_ = 0;
};

// The scheduler of config.kind.
std::unique_ptr<Scheduler> make_scheduler(const SchedulerConfig& config);

}  // namespace loom::unet
