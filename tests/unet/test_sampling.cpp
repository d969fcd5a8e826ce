// The samplers of `loom sample` (SPEC §8) against diffusers itself (tests/unet/fixtures/sampling,
// made by make_sampling_fixtures.py): DDIMScheduler, EulerDiscreteScheduler and
// DPMSolverMultistepScheduler timesteps, sigmas and init_noise_sigma for many configurations
// (exactly, with torch's f32 sqrt/log/exp correctly rounded; to one f32 ulp with them as they are); the schedulers alone stepped with given model outputs (f64 ≤ 1e-10, f32 ≤ 1e-5);
// the guided pipeline loop with the tiny SD-1.x-like and SDXL-like UNets (f64 ≤ 1e-10, f32
// ≤ 1e-4); scheduler_config.json reading, and the named errors (ctest -L unet).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "attention/attention.h"
#include "io/tensor_file.h"
#include "tests/test_helpers.h"
#include "unet/sampling.h"
#include "unet/unet_io.h"

#ifndef LOOM_UNET_FIXTURE_DIR
#error "LOOM_UNET_FIXTURE_DIR must name tests/unet/fixtures"
#endif

namespace loom::unet {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using ::testing::Not;
using loom::testing::error_of;
using loom::testing::kNoError;
using loom::testing::rel_error;
constexpr DType F64 = DType::F64;
constexpr DType F32 = DType::F32;

std::string fixture(const std::string& name) { return std::string(LOOM_UNET_FIXTURE_DIR) + "/" + name; }

// A golden file and its cases: metadata entries whose value is a JSON object with "scheduler".
struct GoldenFile {
  io::TensorFile file;
  std::vector<std::pair<std::string, json>> cases;

  explicit GoldenFile(const std::string& name) : file(io::read_tensor_file(fixture("sampling/" + name))) {
    for (const auto& [key, value] : file.metadata) {
      const json j = json::parse(value, nullptr, false);
      if (j.is_object() && j.contains("scheduler")) cases.emplace_back(key, j);
    }
  }
  Tensor get(const std::string& key, DType dtype = F64) const {
    const Tensor* t = file.find(key);
    EXPECT_NE(t, nullptr) << "fixture lacks " << key;
    return t ? t->to(dtype) : Tensor();
  }
  Tensor maybe(const std::string& key, DType dtype) const {
    const Tensor* t = file.find(key);
    return t ? t->to(dtype) : Tensor();
  }
};

SchedulerConfig config_of(const json& c) {
  return SchedulerConfig::from_json_text(c.at("config").dump(), parse_scheduler_kind(c.at("scheduler")), "case");
}

std::vector<double> as_doubles(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// ---- schedules ----------------------------------------------------------------------------------------

TEST(Schedules, TimestepsSigmasAndInitNoiseSigmaEqualDiffusers) {
  const GoldenFile g("schedules.safetensors");
  ASSERT_GE(g.cases.size(), 60u);
  for (const auto& [name, c] : g.cases) {
    SCOPED_TRACE(name);
    const auto s = make_scheduler(config_of(c));
    s->set_timesteps(c.at("steps").get<int64_t>());
    EXPECT_EQ(s->timesteps(), g.get(name + ".timesteps").to_vector());
    EXPECT_EQ(s->init_noise_sigma(), g.get(name + ".init_noise_sigma").item());
    if (c.at("scheduler") == "ddim") continue;
    EXPECT_EQ(as_doubles(s->sigmas()), g.get(name + ".sigmas").to_vector());
    // diffusers unchanged (torch's f32 sqrt is not correctly rounded here): within one f32 ulp
    const std::vector<double> torch_sigmas = g.get(name + ".sigmas_torch").to_vector();
    ASSERT_EQ(torch_sigmas.size(), s->sigmas().size());
    for (size_t i = 0; i < torch_sigmas.size(); ++i)
      EXPECT_LE(std::abs(s->sigmas()[i] - torch_sigmas[i]), std::ldexp(std::abs(torch_sigmas[i]), -23)) << i;
  }
}

TEST(Schedules, StableDiffusion15DefaultsAreSpecs) {
  for (const auto kind : {SchedulerKind::DDIM, SchedulerKind::Euler, SchedulerKind::DPMSolverMultistep}) {
    const SchedulerConfig c = SchedulerConfig::stable_diffusion_v1_5(kind);
    EXPECT_EQ(c.kind, kind);
    EXPECT_EQ(c.noise.beta_schedule, "scaled_linear");
    EXPECT_EQ(c.noise.beta_start, 0.00085);
    EXPECT_EQ(c.noise.beta_end, 0.012);
    EXPECT_EQ(c.noise.num_train_timesteps, 1000);
    EXPECT_EQ(c.steps_offset, 1);
    if (kind == SchedulerKind::DDIM) {  // keys DDIMScheduler alone reads
      EXPECT_FALSE(c.set_alpha_to_one);
      EXPECT_FALSE(c.clip_sample);
    }
    EXPECT_EQ(c.timestep_spacing, "leading");
    EXPECT_EQ(c.noise.prediction_type, "epsilon");
    EXPECT_TRUE(c.notes.empty());
  }
  // SD 1.5 with DDIM at 50 steps: 981, 961, …, 1 (the pipeline's well-known schedule)
  const auto s = make_scheduler(SchedulerConfig::stable_diffusion_v1_5(SchedulerKind::DDIM));
  s->set_timesteps(50);
  EXPECT_EQ(s->timesteps().front(), 981);
  EXPECT_EQ(s->timesteps().back(), 1);
}

// ---- the schedulers alone --------------------------------------------------------------------------------

TEST(Schedulers, TrajectoriesWithGivenModelOutputsMatchDiffusers) {
  const GoldenFile g("trajectories.safetensors");
  ASSERT_GE(g.cases.size(), 15u);
  for (const auto& [name, c] : g.cases) {
    SCOPED_TRACE(name);
    const DType dtype = c.at("dtype") == "f64" ? F64 : F32;
    const auto s = make_scheduler(config_of(c));
    s->set_timesteps(c.at("steps").get<int64_t>());
    const Tensor outputs = g.get(name + ".model_outputs", dtype), want = g.get(name + ".samples");
    ASSERT_EQ(outputs.size(0), s->num_steps());
    Tensor x = g.get(name + ".sample", dtype);
    for (int64_t i = 0; i < s->num_steps(); ++i) {
      EXPECT_EQ(s->scale_model_input(x, i).shape(), x.shape());
      x = s->step(outputs.select(0, i).contiguous(), i, x);
      ASSERT_EQ(x.dtype(), dtype);
      EXPECT_LE(rel_error(x.to(F64), want.select(0, i)), dtype == F64 ? 1e-10 : 1e-5) << "after step " << i;
    }
  }
}

TEST(Schedulers, EulerScalesTheModelInputBySigma) {
  const auto s = make_scheduler(SchedulerConfig::stable_diffusion_v1_5(SchedulerKind::Euler));
  s->set_timesteps(10);
  const double sigma = s->sigmas()[3];
  const Tensor x = Tensor::full({1, 2, 2, 2}, 3.0, F64);
  EXPECT_NEAR(s->scale_model_input(x, 3).to_vector()[0], 3.0 / std::sqrt(sigma * sigma + 1), 1e-6);
  EXPECT_DOUBLE_EQ(s->init_noise_sigma(), double(std::sqrt(s->sigmas()[0] * s->sigmas()[0] + 1.0f)));
}

TEST(Schedulers, NamedErrors) {
  EXPECT_THAT(error_of([] { parse_scheduler_kind("pndm"); }), HasSubstr("'pndm' is not one of ddim, euler, dpmpp_2m"));
  const auto ddim = make_scheduler(SchedulerConfig::stable_diffusion_v1_5(SchedulerKind::DDIM));
  const Tensor x = Tensor::zeros({1, 1, 2, 2}, F64);
  EXPECT_THAT(error_of([&] { ddim->step(x, 0, x); }), HasSubstr("call set_timesteps before step"));
  EXPECT_THAT(error_of([&] { ddim->set_timesteps(0); }), HasSubstr("at least 1, got 0"));
  EXPECT_THAT(error_of([&] { ddim->set_timesteps(1001); }), HasSubstr("cannot be more than num_train_timesteps 1000"));
  EXPECT_THAT(error_of([&] { ddim->set_timesteps(1000); }), HasSubstr("steps_offset 1 too large"));
  ddim->set_timesteps(5);
  EXPECT_THAT(error_of([&] { ddim->step(x, 5, x); }), HasSubstr("step 5 is outside 0..4"));
  EXPECT_THAT(error_of([&] { ddim->step(x.to(F32), 0, x); }), HasSubstr("does not match the sample"));
  const auto dpm = make_scheduler(SchedulerConfig::stable_diffusion_v1_5(SchedulerKind::DPMSolverMultistep));
  dpm->set_timesteps(5);
  EXPECT_THAT(error_of([&] { dpm->step(x, 1, x); }), HasSubstr("step 1 out of order (expected step 0"));
  dpm->step(x, 0, x);
  dpm->set_timesteps(5);  // resets the solver
  EXPECT_EQ(error_of([&] { dpm->step(x, 0, x); }), kNoError);
}

// ---- scheduler_config.json -----------------------------------------------------------------------------

SchedulerConfig read(const std::string& text, SchedulerKind kind) {
  return SchedulerConfig::from_json_text(text, kind, "cfg.json");
}

TEST(SchedulerConfigFile, ClassDefaultsForMissingKeysAndNotesForUnusedOnes) {
  // diffusers' from_config: keys the file lacks take the chosen class's defaults.
  EXPECT_EQ(read("{}", SchedulerKind::DDIM).timestep_spacing, "leading");
  EXPECT_EQ(read("{}", SchedulerKind::Euler).timestep_spacing, "linspace");
  EXPECT_TRUE(read("{}", SchedulerKind::DDIM).clip_sample);
  EXPECT_EQ(read("{}", SchedulerKind::DDIM).noise.beta_schedule, "linear");

  const SchedulerConfig sdxl = SchedulerConfig::from_file(fixture("sampling/sdxl_scheduler_config.json"),
                                                          SchedulerKind::DDIM);
  EXPECT_EQ(sdxl.timestep_spacing, "leading");
  EXPECT_EQ(sdxl.steps_offset, 1);
  std::string notes;
  for (const auto& n : sdxl.notes) notes += n + "\n";
  EXPECT_THAT(notes, HasSubstr("written for EulerDiscreteScheduler"));
  EXPECT_THAT(notes, HasSubstr("not used by DDIMScheduler: interpolation_type, skip_prk_steps, use_karras_sigmas"));
  EXPECT_THAT(notes, Not(HasSubstr("_diffusers_version")));

  // Keys a saved config marks as its class's defaults are not carried over.
  EXPECT_EQ(read(R"({"timestep_spacing": "trailing", "_use_default_values": ["timestep_spacing"]})",
                 SchedulerKind::Euler).timestep_spacing, "linspace");
  // Python's json writes -Infinity bare (DPMSolverMultistepScheduler's lambda_min_clipped).
  EXPECT_EQ(read(R"({"lambda_min_clipped": -Infinity, "x": "NaN inside a string"})",
                 SchedulerKind::DPMSolverMultistep).lambda_min_clipped, -INFINITY);
  // diffusers' remappings
  EXPECT_EQ(read(R"({"solver_type": "bh2"})", SchedulerKind::DPMSolverMultistep).solver_type, "midpoint");
}

TEST(SchedulerConfigFile, ValuesLoomDoesNotImplementAreNamedErrors) {
  const struct {
    const char* text;
    SchedulerKind kind;
    const char* expected;
  } cases[] = {
      {R"({"use_karras_sigmas": true})", SchedulerKind::Euler, "key 'use_karras_sigmas' = true: not supported by loom's EulerDiscreteScheduler"},
      {R"({"solver_order": 3})", SchedulerKind::DPMSolverMultistep, "key 'solver_order' = 3: not supported"},
      {R"({"algorithm_type": "sde-dpmsolver++"})", SchedulerKind::DPMSolverMultistep, "(loom implements dpmsolver++)"},
      {R"({"prediction_type": "sample"})", SchedulerKind::DDIM, "(loom implements epsilon, v_prediction)"},
      {R"({"timestep_spacing": "even"})", SchedulerKind::Euler, "(loom implements leading, trailing, linspace)"},
      {R"({"trained_betas": [0.1, 0.2]})", SchedulerKind::DDIM, "key 'trained_betas'"},
      {R"({"rescale_betas_zero_snr": true})", SchedulerKind::Euler, "key 'rescale_betas_zero_snr'"},
      {R"({"interpolation_type": "log_linear"})", SchedulerKind::Euler, "key 'interpolation_type'"},
      {R"({"final_sigmas_type": "one"})", SchedulerKind::DPMSolverMultistep, "(loom implements zero, sigma_min)"},
      {R"({"thresholding": true})", SchedulerKind::DDIM, "key 'thresholding'"},
      {R"({"beta_schedule": "sigmoid"})", SchedulerKind::DDIM, "key 'beta_schedule' = \"sigmoid\""},
      {R"({"steps_offset": 1.5})", SchedulerKind::DDIM, "key 'steps_offset' = 1.5: must be an integer"},
      {R"({"prediction_type": "v_prediction", "timestep_type": "continuous"})", SchedulerKind::Euler, "key 'timestep_type'"},
      {R"([1, 2])", SchedulerKind::DDIM, "expected a JSON object"},
      {R"({"beta_start": )", SchedulerKind::DDIM, "not valid JSON"},
  };
  for (const auto& c : cases)
    EXPECT_THAT(error_of([&] { read(c.text, c.kind); }), HasSubstr(c.expected)) << c.text;
  // Keys of other schedulers are notes, not errors.
  EXPECT_EQ(error_of([] { read(R"({"use_karras_sigmas": true})", SchedulerKind::DDIM); }), kNoError);
}

TEST(SchedulerConfigFile, FileErrorsNameThePathOnce) {
  loom::testing::TempDir dir;
  try {
    SchedulerConfig::from_file(dir / "missing.json", SchedulerKind::DDIM);
    ADD_FAILURE() << "no error";
  } catch (const io::FileError& e) {
    EXPECT_THAT(e.what(), HasSubstr("missing.json: cannot be read"));
  }
  loom::testing::write_bytes(dir / "bad.json", R"({"solver_order": 3})");
  try {
    SchedulerConfig::from_file(dir / "bad.json", SchedulerKind::DPMSolverMultistep);
    ADD_FAILURE() << "no error";
  } catch (const io::FileError& e) {
    const std::string msg = e.what();
    EXPECT_THAT(msg, HasSubstr("bad.json: key 'solver_order'"));
    EXPECT_EQ(msg.find("bad.json"), msg.rfind("bad.json")) << msg;
  }
}

// ---- the guided pipeline loop with a UNet ----------------------------------------------------------------

SamplingConditioning conditioning(const GoldenFile& g, DType dtype) {
  SamplingConditioning c;
  c.encoder_hidden_states = g.maybe("encoder_hidden_states", dtype);
  c.negative_encoder_hidden_states = g.maybe("negative_encoder_hidden_states", dtype);
  c.text_embeds = g.maybe("text_embeds", dtype);
  c.negative_text_embeds = g.maybe("negative_text_embeds", dtype);
  c.time_ids = g.maybe("time_ids", dtype);
  c.negative_time_ids = g.maybe("negative_time_ids", dtype);
  return c;
}

void expect_pipeline_matches(const std::string& model, DType dtype, double tolerance, const std::string& only = "") {
  const GoldenFile g(model + "_sampling.safetensors");
  UNetLoadOptions lo;
  lo.dtype = dtype;
  const auto unet = load_unet_dir(fixture(model), lo).model;
  const SamplingConditioning cond = conditioning(g, dtype);
  int ran = 0;
  for (const auto& [name, c] : g.cases) {
    if (!only.empty() && name != only) continue;
    SCOPED_TRACE(model + " " + name);
    const auto s = make_scheduler(config_of(c));
    SamplingOptions o;
    o.steps = c.at("steps").get<int64_t>();
    o.guidance_scale = c.at("guidance_scale").get<double>();
    o.model_dtype = dtype;
    std::vector<double> seen;
    const Tensor out = sample_latents(*unet, *s, g.get(name + ".latents", dtype), cond, o,
                                      [&](const SamplingStep& st) { seen.push_back(st.timestep); });
    EXPECT_EQ(seen, s->timesteps());
    EXPECT_LE(rel_error(out.to(F64), g.get(name + ".output")), tolerance);
    ++ran;
  }
  EXPECT_GT(ran, 0);
}

TEST(Sampling, Sd1LikeUNetEveryScheduler_BothPredictionTypes_F64) { expect_pipeline_matches("sd1", F64, 1e-10); }
TEST(Sampling, SdxlLikeUNetWithTextTime_F64) { expect_pipeline_matches("sdxl", F64, 1e-10); }
TEST(Sampling, F32FollowsTheF64Golden) {
  expect_pipeline_matches("sd1", F32, 1e-4, "dpmpp_2m");
  expect_pipeline_matches("sdxl", F32, 1e-4, "euler");
}

TEST(Sampling, KeepAllMasksChangeNothing) {
  const GoldenFile g("sd1_sampling.safetensors");
  UNetLoadOptions lo;
  lo.dtype = F64;
  const auto unet = load_unet_dir(fixture("sd1"), lo).model;
  SamplingConditioning cond = conditioning(g, F64);
  SamplingOptions o;
  o.steps = 2;
  o.model_dtype = F64;
  auto run = [&] {
    const auto s = make_scheduler(SchedulerConfig::stable_diffusion_v1_5(SchedulerKind::Euler));
    return sample_latents(*unet, *s, g.get("euler.latents"), cond, o);
  };
  const Tensor plain = run();
  cond.encoder_attention_mask = Tensor::ones({2, 5}, F64);  // the negative one defaults to keep-all
  EXPECT_EQ(rel_error(run(), plain), 0.0);
  cond.negative_encoder_attention_mask = Tensor::ones({2, 5}, F64);
  cond.negative_encoder_attention_mask.narrow(1, 4, 1).fill_(0.0);  // drop a token of the negative prompt
  EXPECT_GT(rel_error(run(), plain), 1e-6);
}

// The loop turns every attention layer's context cache on for its steps (the F64 goldens above run
// with it) and off again after; a layer whose cache was on already keeps it on.
TEST(Sampling, ContextCacheIsOnlyTheLoops) {
  const GoldenFile g("sd1_sampling.safetensors");
  UNetLoadOptions lo;
  lo.dtype = F64;
  const auto unet = load_unet_dir(fixture("sd1"), lo).model;
  std::vector<std::shared_ptr<attention::Attention>> layers;
  for (const auto& [name, module] : unet->named_modules())
    if (auto attn = std::dynamic_pointer_cast<attention::Attention>(module)) layers.push_back(attn);
  ASSERT_GE(layers.size(), 2u);
  layers[0]->set_context_cache(true);
  SamplingOptions o;
  o.steps = 2;
  o.model_dtype = F64;
  bool on_during_steps = true;
  const auto s = make_scheduler(SchedulerConfig::stable_diffusion_v1_5(SchedulerKind::Euler));
  sample_latents(*unet, *s, g.get("euler.latents"), conditioning(g, F64), o, [&](const SamplingStep&) {
    for (const auto& attn : layers) on_during_steps = on_during_steps && attn->context_cache();
  });
  EXPECT_TRUE(on_during_steps);
  EXPECT_TRUE(layers[0]->context_cache()) << "a cache that was on before the loop was turned off";
  for (size_t i = 1; i < layers.size(); ++i) EXPECT_FALSE(layers[i]->context_cache()) << "layer " << i;
}

TEST(Sampling, InputChecksNameTheTensor) {
  const UNet2DConditionConfig sd1 = UNet2DConditionConfig::from_file(fixture("sd1/config.json"));
  const UNet2DConditionConfig sdxl = UNet2DConditionConfig::from_file(fixture("sdxl/config.json"));
  const Shape latents{2, 4, 8, 8};
  SamplingConditioning c;
  auto check = [&](const UNet2DConditionConfig& cfg, double guidance, const Shape& lat = {2, 4, 8, 8}) {
    return error_of([&] { check_sampling_inputs(cfg, lat, c, guidance); });
  };
  EXPECT_THAT(check(sd1, 7.5), HasSubstr("encoder_hidden_states is missing"));
  c.encoder_hidden_states = Tensor::zeros({2, 5, 12});
  EXPECT_THAT(check(sd1, 7.5), HasSubstr("negative_encoder_hidden_states is missing: guidance scale 7.5 > 1"));
  EXPECT_EQ(check(sd1, 1.0), kNoError);  // no guidance: the positive prompt alone
  c.negative_encoder_hidden_states = Tensor::zeros({2, 7, 12});
  EXPECT_THAT(check(sd1, 7.5), HasSubstr("negative_encoder_hidden_states has shape [2, 7, 12], expected the shape of "
                                         "encoder_hidden_states [2, 5, 12]"));
  c.negative_encoder_hidden_states = Tensor::zeros({2, 5, 12});
  EXPECT_EQ(check(sd1, 7.5), kNoError);
  EXPECT_THAT(check(sd1, 7.5, {2, 3, 8, 8}), HasSubstr("latents have shape [2, 3, 8, 8], expected [N, 4, h, w]"));
  EXPECT_THAT(check(sd1, 7.5, {3, 4, 8, 8}), HasSubstr("encoder_hidden_states has shape [2, 5, 12], expected [3, K, 12]"));
  c.encoder_attention_mask = Tensor::ones({2, 4});
  EXPECT_THAT(check(sd1, 7.5), HasSubstr("encoder_attention_mask has shape [2, 4], expected [N, K] = [2, 5]"));
  c.encoder_attention_mask = Tensor();
  c.text_embeds = Tensor::zeros({2, 8});
  EXPECT_THAT(check(sd1, 7.5), HasSubstr("text_embeds is given but the UNet's config has no addition_embed_type"));
  c.text_embeds = Tensor();
  EXPECT_THAT(check(sdxl, 7.5), HasSubstr("text_embeds is missing: the UNet's config has addition_embed_type"));
  c.text_embeds = Tensor::zeros({2, 8});
  EXPECT_THAT(check(sdxl, 7.5), HasSubstr("time_ids is missing"));
  c.time_ids = Tensor::zeros({2, 5});
  EXPECT_THAT(check(sdxl, 7.5), HasSubstr("time_ids has shape [2, 5], expected [2, 6]"));
  c.time_ids = Tensor::zeros({2, 6});
  EXPECT_THAT(check(sdxl, 7.5), HasSubstr("negative_text_embeds is missing"));
  EXPECT_EQ(check(sdxl, 1.0), kNoError);
  c.negative_text_embeds = Tensor::zeros({2, 9});
  EXPECT_THAT(check(sdxl, 7.5), HasSubstr("negative_text_embeds has shape [2, 9], expected [2, 8]"));
  c.negative_text_embeds = Tensor::zeros({2, 8});
  EXPECT_EQ(check(sdxl, 7.5), kNoError);
}

}  // namespace
}  // namespace loom::unet
