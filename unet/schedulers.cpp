// DDIM, Euler and DPM++ 2M as diffusers 0.42 computes them (see schedulers.h). Scalar
// coefficients are f32 values computed in f32, in diffusers' order; this file is compiled
// with -ffp-contract=off so that no a·b + c becomes one fused (differently rounded) operation.
#include "unet/schedulers.h"

#include <algorithm>
#include <cmath>

#include "tensor/ops.h"

namespace loom::unet {
namespace {

// ---- numpy, as diffusers' set_timesteps calls it ------------------------------------------------

// np.arange(start, stop, step) in f64: ceil((stop − start)/step) values, a[0] = start,
// a[1] = start + step, a[i] = start + i·(a[1] − a[0]) (numpy's fill rule).
std::vector<double> np_arange(double start, double stop, double step) {
  const double n = std::ceil((stop - start) / step);
  std::vector<double> a;
  if (!(n > 0)) return a;
  a.resize(size_t(n));
  a[0] = start;
  if (a.size() > 1) a[1] = start + step;
  const double delta = (a.size() > 1 ? a[1] : start + step) - start;
  for (size_t i = 2; i < a.size(); ++i) a[i] = start + double(i) * delta;
  return a;
}

// np.linspace(start, stop, num) in f64: i·step + start, the last value exactly stop.
std::vector<double> np_linspace(double start, double stop, int64_t num) {
  std::vector<double> y(size_t(std::max<int64_t>(num, 0)));
  if (num == 1) y[0] = start;
  if (num < 2) return y;
  const double step = (stop - start) / double(num - 1);
  for (int64_t i = 0; i < num; ++i) y[size_t(i)] = double(i) * step + start;
  y.back() = stop;
  return y;
}

// np.round: half to even.
double np_round(double x) { return std::nearbyint(x); }

// np.interp(x, arange(len(fp)), fp) in f64.
double np_interp(double x, const std::vector<float>& fp) {
  const double last = double(fp.size() - 1);
  if (x > last || std::isnan(x)) return std::isnan(x) ? x : double(fp.back());
  if (x < 0) return double(fp.front());
  const size_t j = size_t(std::floor(x));
  if (j == fp.size() - 1 || double(j) == x) return double(fp[j]);
  const double slope = double(fp[j + 1]) - double(fp[j]);  // Δy / Δx with Δx = 1
  return slope * (x - double(j)) + double(fp[j]);
}

std::vector<double> reversed(std::vector<double> v) {
  std::reverse(v.begin(), v.end());
  return v;
}

std::vector<double> rounded(std::vector<double> v) {
  for (double& x : v) x = np_round(x);
  return v;
}

// sqrt((1 − ᾱ)/ᾱ) in f32, as diffusers computes its training sigmas.
float sigma_of(float alpha_cumprod) { return std::sqrt((1.0f - alpha_cumprod) / alpha_cumprod); }

std::vector<float> training_sigmas(const std::vector<float>& alphas_cumprod) {
  std::vector<float> s(alphas_cumprod.size());
  for (size_t i = 0; i < s.size(); ++i) s[i] = sigma_of(alphas_cumprod[i]);
  return s;
}

// σ at each (possibly fractional) timestep, np.interp in f64 then f32, plus the final σ.
std::vector<float> sigmas_at(const std::vector<double>& timesteps, const std::vector<float>& alphas_cumprod,
                             const std::string& final_sigmas_type) {
  const std::vector<float> train = training_sigmas(alphas_cumprod);
  std::vector<float> s;
  for (double t : timesteps) s.push_back(float(np_interp(t, train)));
  s.push_back(final_sigmas_type == "sigma_min" ? sigma_of(alphas_cumprod[0]) : 0.0f);
  return s;
}

// ---- tensor arithmetic with f32 scalars --------------------------------------------------------

Tensor scaled(const Tensor& x, float s) { return ops::mul_scalar(x, double(s)); }
Tensor divided(const Tensor& x, float s) { return ops::div(x, Tensor::scalar(double(s), x.dtype(), x.device())); }

void check_steps(int64_t n, const char* cls) {
  LOOM_CHECK(n >= 1, cls, ": the number of inference steps must be at least 1, got ", n);
}

}  // namespace

// ---- Scheduler -------------------------------------------------------------------------------------

Scheduler::Scheduler(const SchedulerConfig& config) : config_(config), schedule_(config.noise) {}

Tensor Scheduler::scale_model_input(const Tensor& sample, int64_t) const { return sample; }

void Scheduler::check_step(int64_t step, const Tensor& model_output, const Tensor& sample) const {
  const char* cls = scheduler_class_name(config_.kind);
  LOOM_CHECK(!timesteps_.empty(), cls, ": call set_timesteps before step");
  LOOM_CHECK(step >= 0 && step < num_steps(), cls, ": step ", step, " is outside 0..", num_steps() - 1);
  LOOM_CHECK(model_output.shape() == sample.shape() && model_output.dtype() == sample.dtype(), cls,
             ": model output ", model_output.str(), " does not match the sample ", sample.str());
}

std::unique_ptr<Scheduler> make_scheduler(const SchedulerConfig& config) {
  switch (config.kind) {
    case SchedulerKind::DDIM: return std::make_unique<DDIMScheduler>(config);
    case SchedulerKind::Euler: return std::make_unique<EulerDiscreteScheduler>(config);
    case SchedulerKind::DPMSolverMultistep: return std::make_unique<DPMSolverMultistepScheduler>(config);
  }
  LOOM_FAIL("make_scheduler: unknown kind ", int(config.kind));
}

// ---- DDIM ---------------------------------------------------------------------------------------------

DDIMScheduler::DDIMScheduler(const SchedulerConfig& config) : Scheduler(config) {}

void DDIMScheduler::set_timesteps(int64_t n) {
  check_steps(n, "DDIMScheduler");
  const int64_t T = config_.noise.num_train_timesteps;
  LOOM_CHECK(n <= T, "DDIMScheduler: ", n, " inference steps cannot be more than num_train_timesteps ", T);
  num_inference_steps_ = n;
  const std::string& spacing = config_.timestep_spacing;
  if (spacing == "linspace") {
    timesteps_ = reversed(rounded(np_linspace(0, double(T - 1), n)));
  } else if (spacing == "leading") {
    timesteps_ = reversed(rounded(np_arange(0, double(n), 1)));
    for (double& t : timesteps_) t = t * double(T / n) + double(config_.steps_offset);
  } else {  // trailing
    timesteps_ = rounded(np_arange(double(T), 0, -double(T) / double(n)));
    for (double& t : timesteps_) t -= 1;
  }
  // Trailing spacing gives a last timestep of −1 for some n (61, 103, …), as in diffusers, which then
  // reads alphas_cumprod[−1] (Python indexing: the last entry); leading + steps_offset can pass T − 1,
  // where diffusers fails with an IndexError.
  for (double t : timesteps_)
    LOOM_CHECK(t >= -double(T) && t < double(T), "DDIMScheduler: timestep ", t, " is outside 0..", T - 1,
               " (steps_offset ", config_.steps_offset, " too large for ", n, " steps?)");
}

Tensor DDIMScheduler::step(const Tensor& model_output, int64_t step, const Tensor& sample) {
  check_step(step, model_output, sample);
  const std::vector<float>& ac = schedule_.alphas_cumprod();
  const int64_t t = int64_t(timesteps_[size_t(step)]);
  const int64_t prev_t = t - config_.noise.num_train_timesteps / num_inference_steps_;
  const float alpha_t = ac[size_t(t >= 0 ? t : t + int64_t(ac.size()))];  // Python's ac[-1] (see set_timesteps)
  const float alpha_prev = prev_t >= 0 ? ac[size_t(prev_t)] : (config_.set_alpha_to_one ? 1.0f : ac[0]);
  const float beta_t = 1.0f - alpha_t;
  Tensor x0, eps;
  if (config_.noise.prediction_type == "epsilon") {
    x0 = divided(ops::sub(sample, scaled(model_output, std::sqrt(beta_t))), std::sqrt(alpha_t));
    eps = model_output;
  } else {  // v_prediction
    x0 = ops::sub(scaled(sample, std::sqrt(alpha_t)), scaled(model_output, std::sqrt(beta_t)));
    eps = ops::add(scaled(model_output, std::sqrt(alpha_t)), scaled(sample, std::sqrt(beta_t)));
  }
  if (config_.clip_sample) {
    const double r = config_.clip_sample_range;
    x0 = ops::minimum(ops::maximum(x0, Tensor::scalar(-r, x0.dtype(), x0.device())),
                      Tensor::scalar(r, x0.dtype(), x0.device()));
  }
  const float std_dev_t = 0.0f;  // eta 0
  const float direction = std::sqrt(1.0f - alpha_prev - std_dev_t * std_dev_t);
  return ops::add(scaled(x0, std::sqrt(alpha_prev)), scaled(eps, direction));
}

// ---- Euler --------------------------------------------------------------------------------------------

EulerDiscreteScheduler::EulerDiscreteScheduler(const SchedulerConfig& config) : Scheduler(config) {}

void EulerDiscreteScheduler::set_timesteps(int64_t n) {
  check_steps(n, "EulerDiscreteScheduler");
  const int64_t T = config_.noise.num_train_timesteps;
  num_inference_steps_ = n;
  const std::string& spacing = config_.timestep_spacing;
  if (spacing == "linspace") {
    timesteps_ = reversed(np_linspace(0, double(T - 1), n));
  } else if (spacing == "leading") {
    timesteps_ = reversed(rounded(np_arange(0, double(n), 1)));
    for (double& t : timesteps_) t = t * double(T / n);
  } else {  // trailing
    timesteps_ = rounded(np_arange(double(T), 0, -double(T) / double(n)));
  }
  for (double& t : timesteps_) {  // float32 timesteps; += steps_offset / −= 1 in f32
    t = double(float(t));
    if (spacing == "leading") t = double(float(t) + float(config_.steps_offset));
    if (spacing == "trailing") t = double(float(t) - 1.0f);
  }
  sigmas_ = sigmas_at(timesteps_, schedule_.alphas_cumprod(), config_.final_sigmas_type);
}

double EulerDiscreteScheduler::init_noise_sigma() const {
  LOOM_CHECK(!sigmas_.empty(), "EulerDiscreteScheduler: call set_timesteps before init_noise_sigma");
  const float max_sigma = *std::max_element(sigmas_.begin(), sigmas_.end());
  if (config_.timestep_spacing == "linspace" || config_.timestep_spacing == "trailing") return max_sigma;
  return std::sqrt(max_sigma * max_sigma + 1.0f);
}

Tensor EulerDiscreteScheduler::scale_model_input(const Tensor& sample, int64_t step) const {
  LOOM_CHECK(step >= 0 && step < num_steps(), "EulerDiscreteScheduler: step ", step, " is outside 0..", num_steps() - 1);
  const float sigma = sigmas_[size_t(step)];
  return divided(sample, std::sqrt(sigma * sigma + 1.0f));
}

Tensor EulerDiscreteScheduler::step(const Tensor& model_output, int64_t step, const Tensor& sample) {
  check_step(step, model_output, sample);
  const float sigma = sigmas_[size_t(step)];
  const float sigma_hat = sigma * (0.0f + 1.0f);  // no churn
  Tensor x0;
  if (config_.noise.prediction_type == "epsilon") {
    x0 = ops::sub(sample, scaled(model_output, sigma_hat));
  } else {  // v_prediction
    const float c_out = -sigma / std::sqrt(sigma * sigma + 1.0f);
    x0 = ops::add(scaled(model_output, c_out), divided(sample, sigma * sigma + 1.0f));
  }
  const Tensor derivative = divided(ops::sub(sample, x0), sigma_hat);
  const float dt = sigmas_[size_t(step) + 1] - sigma_hat;
  return ops::add(sample, scaled(derivative, dt));
}

// ---- DPM-Solver++ (multistep) ---------------------------------------------------------------------------

namespace {

// log and exp of f32 values, correctly rounded (in f64, then rounded to f32). diffusers calls
// torch.log / torch.exp on 0-d f32 tensors, which SLEEF evaluates within 1 ulp; see the fixture
// generator (make_sampling_fixtures.py) for how the f64 goldens pin this down.
float log_f32(float x) { return float(std::log(double(x))); }
float exp_f32(float x) { return float(std::exp(double(x))); }

// diffusers' _sigma_to_alpha_sigma_t and λ = log α − log σ, in f32.
struct NoiseLevel {
  float alpha, sigma, lambda;
  explicit NoiseLevel(float s) {
    alpha = 1.0f / std::sqrt(s * s + 1.0f);
    sigma = s * alpha;
    lambda = log_f32(alpha) - log_f32(sigma);
  }
};

}  // namespace

DPMSolverMultistepScheduler::DPMSolverMultistepScheduler(const SchedulerConfig& config) : Scheduler(config) {}

void DPMSolverMultistepScheduler::set_timesteps(int64_t n) {
  check_steps(n, "DPMSolverMultistepScheduler");
  const int64_t T = config_.noise.num_train_timesteps;
  const std::vector<float>& ac = schedule_.alphas_cumprod();
  // searchsorted(flip(λ_t), lambda_min_clipped): the training steps whose λ is below the clip.
  int64_t clipped = 0;
  for (float a : ac) {
    const float lambda = log_f32(std::sqrt(a)) - log_f32(std::sqrt(1.0f - a));
    clipped += double(lambda) < config_.lambda_min_clipped;
  }
  const int64_t last = T - clipped;
  const std::string& spacing = config_.timestep_spacing;
  std::vector<double> ts;
  if (spacing == "linspace") {
    ts = reversed(rounded(np_linspace(0, double(last - 1), n + 1)));
    ts.pop_back();
  } else if (spacing == "leading") {
    const int64_t ratio = last / (n + 1);
    ts = reversed(rounded(np_arange(0, double(n + 1), 1)));
    ts.pop_back();
    for (double& t : ts) t = t * double(ratio) + double(config_.steps_offset);
  } else {  // trailing
    ts = rounded(np_arange(double(last), 0, -double(T) / double(n)));
    for (double& t : ts) t -= 1;
  }
  timesteps_ = ts;  // (trailing can end with −1, as in diffusers; np.interp then gives σ at t = 0)
  sigmas_ = sigmas_at(timesteps_, ac, config_.final_sigmas_type);
  num_inference_steps_ = num_steps();
  previous_x0_ = Tensor();
  lower_order_nums_ = 0;
  next_step_ = 0;
}

Tensor DPMSolverMultistepScheduler::step(const Tensor& model_output, int64_t step, const Tensor& sample) {
  check_step(step, model_output, sample);
  LOOM_CHECK(step == next_step_, "DPMSolverMultistepScheduler: step ", step, " out of order (expected step ",
             next_step_, "; the solver remembers the previous step)");
  const bool last_step = step == num_steps() - 1;
  const bool lower_order_final =
      last_step && (config_.euler_at_final || (config_.lower_order_final && num_steps() < 15) ||
                    config_.final_sigmas_type == "zero");
  // convert_model_output: the data prediction x0.
  const NoiseLevel s0(sigmas_[size_t(step)]);
  const Tensor x0 = config_.noise.prediction_type == "epsilon"
                        ? divided(ops::sub(sample, scaled(model_output, s0.sigma)), s0.alpha)
                        : ops::sub(scaled(sample, s0.alpha), scaled(model_output, s0.sigma));
  const NoiseLevel t(sigmas_[size_t(step) + 1]);
  const float h = t.lambda - s0.lambda;
  const float em1 = exp_f32(-h) - 1.0f;
  const float data_coef = t.alpha * em1;
  Tensor prev;
  if (config_.solver_order == 1 || lower_order_nums_ < 1 || lower_order_final) {
    prev = ops::sub(scaled(sample, t.sigma / s0.sigma), scaled(x0, data_coef));
  } else {
    const NoiseLevel s1(sigmas_[size_t(step) - 1]);
    const float h_0 = s0.lambda - s1.lambda;
    const float r0 = h_0 / h;
    const Tensor d1 = scaled(ops::sub(x0, previous_x0_), 1.0f / r0);
    const Tensor base = ops::sub(scaled(sample, t.sigma / s0.sigma), scaled(x0, data_coef));
    prev = config_.solver_type == "midpoint" ? ops::sub(base, scaled(d1, 0.5f * data_coef))
                                             : ops::add(base, scaled(d1, t.alpha * (em1 / h + 1.0f)));
  }
  if (lower_order_nums_ < config_.solver_order) ++lower_order_nums_;
  previous_x0_ = x0;
  ++next_step_;
  return prev;
}

}  // namespace loom::unet
