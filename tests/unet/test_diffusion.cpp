// The DDPM objective helpers (unet/diffusion.h) against diffusers' DDPMScheduler
// and training_utils.compute_snr (tests/unet/fixtures/ddpm.safetensors, made by
// make_ddpm_fixtures.py), and the weighted loss's gradient (ctest -L unet).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "tensor/random.h"
#include "io/tensor_file.h"
#include "unet/diffusion.h"

namespace loom::unet {
namespace {

double max_rel(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    worst = std::max(worst, std::abs(a[i] - b[i]) / std::max(std::abs(b[i]), 1e-30));
  return worst;
}

std::vector<double> as_doubles(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

class Schedules : public ::testing::TestWithParam<const char*> {};

TEST_P(Schedules, MatchDiffusersDDPMScheduler) {
  const std::string name = GetParam();
  const io::TensorFile f = io::read_safetensors(std::string(LOOM_UNET_FIXTURE_DIR) + "/ddpm.safetensors");
  auto get = [&](const std::string& k) { return f.find(k)->to(DType::F64); };
  NoiseScheduleConfig c;
  c.beta_schedule = name;
  if (name == "linear") c.beta_start = 0.0001, c.beta_end = 0.02;
  DDPMSchedule s(c);
  // the f32 schedule is bit-identical to diffusers'; f64 add_noise/velocity to rounding; SNR to an f32 ulp
  EXPECT_LE(max_rel(as_doubles(s.betas()), get(name + ".betas").to_vector()), 0.0);
  EXPECT_LE(max_rel(as_doubles(s.alphas_cumprod()), get(name + ".alphas_cumprod").to_vector()), 0.0);
  const Tensor x = get("x"), noise = get("noise"), t = *f.find("timesteps");
  EXPECT_LE(max_rel(s.add_noise(x, noise, t).to_vector(), get(name + ".noisy").to_vector()), 1e-14);
  EXPECT_LE(max_rel(s.velocity(x, noise, t).to_vector(), get(name + ".velocity").to_vector()), 1e-14);
  EXPECT_LE(max_rel(s.snr(t), get(name + ".snr").to_vector()), 1e-6);
  EXPECT_LE(max_rel(s.min_snr_weights(t, 5.0), get(name + ".weights_epsilon").to_vector()), 1e-5);
  c.prediction_type = "v_prediction";
  DDPMSchedule v(c);
  EXPECT_LE(max_rel(v.min_snr_weights(t, 5.0), get(name + ".weights_v").to_vector()), 1e-5);
  EXPECT_EQ(v.target(x, noise, t).to_vector(), v.velocity(x, noise, t).to_vector());
  EXPECT_EQ(s.target(x, noise, t).to_vector(), noise.to_vector());
}

INSTANTIATE_TEST_SUITE_P(Diffusers, Schedules, ::testing::Values("scaled_linear", "linear", "squaredcos_cap_v2"));

TEST(Schedule, BadValuesAreNamedErrors) {
  NoiseScheduleConfig c;
  c.beta_schedule = "sigmoid";
  EXPECT_THAT([&] { DDPMSchedule s(c); }, ::testing::ThrowsMessage<Error>(::testing::HasSubstr("sigmoid")));
  DDPMSchedule s;
  const Tensor x = Tensor::zeros({2, 1}), bad_t = Tensor::from_values({3.5, 1000}, {2}, DType::F64);
  EXPECT_THAT([&] { s.add_noise(x, x, bad_t); }, ::testing::ThrowsMessage<Error>(::testing::HasSubstr("3.5")));
}

TEST(WeightedMse, GradcheckAndPlainMseWhenUnweighted) {
  Generator gen(3);
  const Variable p(Tensor::randn({3, 2, 2}, gen, DType::F64), true), q(Tensor::randn({3, 2, 2}, gen, DType::F64), true);
  const GradcheckResult r = gradcheck(
      [](const std::vector<Variable>& v) { return weighted_mse_loss(v[0], v[1], {0.5, 1.0, 2.0}); }, {p, q});
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_DOUBLE_EQ(weighted_mse_loss(p, q, {}).tensor().item(), mse_loss(p, q).tensor().item());
  EXPECT_NEAR(weighted_mse_loss(p, q, {1.0, 1.0, 1.0}).tensor().item(), mse_loss(p, q).tensor().item(), 1e-15);
}

}  // namespace
}  // namespace loom::unet
