// Training an adapter of a whole UNet with the diffusion objective (SPEC §8), in seconds on the
// sd1 fixture UNet: the loss falls, the saved adapter (whole-UNet PEFT keys) reloads onto a fresh
// model exactly, a resume equals an uninterrupted run (noise and timesteps drawn from the seed,
// accumulation, noise offset, min-SNR-γ, v-prediction), Custom Diffusion on every attn2, LoCon,
// the CPU bf16 path; the seeded draws; data-file errors naming the file and the tensor.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sstream>

#include "adapters/lora.h"
#include "io/adapter_io.h"
#include "io/tensor_file.h"
#include "tests/test_helpers.h"
#include "trainer/diffusion_noise.h"
#include "trainer/diffusion_objective.h"
#include "unet/unet_io.h"

namespace loom::trainer {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using loom::testing::error_of;
using loom::testing::TempDir;

const std::string kSd1 = std::string(LOOM_UNET_FIXTURE_DIR) + "/sd1";

std::shared_ptr<unet::UNet2DConditionModel> sd1() { return unet::load_unet_dir(kSd1).model; }

// N samples of 8×8 latents with context 5×12 (the sd1 fixture's cross_attention_dim), optionally
// with fixed noise and timesteps.
DiffusionData sd1_data(int64_t n, bool fixed_noise, uint64_t seed = 3) {
  Generator gen(seed);
  DiffusionData d;
  d.latents = Tensor::randn({n, 4, 8, 8}, gen);
  d.encoder_hidden_states = Tensor::randn({n, 5, 12}, gen);
  if (fixed_noise) {
    d.noise = Tensor::randn({n, 4, 8, 8}, gen);
    std::vector<double> t;
    for (int64_t i = 0; i < n; ++i) t.push_back(double(100 + 150 * i));
    d.timesteps = Tensor::from_values(t, {n}, DType::F64);
  }
  return d;
}

TrainOptions unet_options(const std::string& out, int64_t steps) {
  TrainOptions o;
  o.out_dir = out, o.quiet = true, o.steps = steps, o.rank = 2, o.lr = 1e-2, o.optimizer = "adam";
  o.device = "cpu", o.max_grad_norm = 1.0;
  o.diffusion.enabled = true;
  return o;
}

Tensor predict(const unet::UNet2DConditionModel& m, const DiffusionData& d) {
  NoGradGuard ng;
  unet::UNetInputs in;
  in.sample = Variable(d.latents);
  in.timestep = Tensor::from_values({500.0}, {1}, DType::F64);
  in.encoder_hidden_states = Variable(d.encoder_hidden_states);
  return m.forward(in).tensor();
}

TEST(UNetTrain, LossFallsAndTheAdapterReloadsExactly) {
  TempDir tmp;
  auto model = sd1();
  const DiffusionData data = sd1_data(3, true);
  TrainOptions o = unet_options(tmp.path() + "/run", 12);
  o.batch_size = 3;
  std::ostringstream log;
  const TrainResult r = train_unet(model, data, o, log);
  ASSERT_EQ(r.losses.size(), 12u);
  EXPECT_LT(r.losses.back(), 0.9 * r.losses.front());
  ASSERT_TRUE(r.lora);
  const Tensor trained = predict(*model, data);

  // Whole-UNet PEFT keys, loaded onto a fresh model from the directory.
  const io::TensorFile f = io::read_safetensors(r.adapter_path);
  EXPECT_NE(f.find("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"), nullptr);
  EXPECT_NE(f.find("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight"), nullptr);
  EXPECT_NE(f.find("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"), nullptr);
  auto fresh = sd1();
  adapters::LoraSet set(fresh);
  const io::AdapterLoadReport report = io::load_lora(set, "reloaded", r.adapter_path);
  EXPECT_TRUE(report.clean()) << report.summary();
  EXPECT_EQ(predict(*fresh, data).to_vector(), trained.to_vector());
}

// Straight 6 steps vs 3 steps then a resume to 6: losses and adapter bit for bit.
TEST(UNetTrain, ResumeWithDrawnNoiseIsExact) {
  TempDir tmp;
  const DiffusionData data = sd1_data(4, false);
  TrainOptions o = unet_options(tmp.path() + "/straight", 6);
  o.batch_size = 2, o.grad_accum = 2, o.seed = 9, o.scheduler = "constant_with_warmup", o.warmup_steps = 2;
  o.diffusion.schedule.prediction_type = "v_prediction", o.diffusion.snr_gamma = 5.0, o.diffusion.noise_offset = 0.1;
  std::ostringstream log;
  const TrainResult straight = train_unet(sd1(), data, o, log);
  TrainOptions first = o;
  first.out_dir = tmp.path() + "/split", first.steps = 3;
  train_unet(sd1(), data, first, log);
  TrainOptions rest = unet_options(tmp.path() + "/split", 6);  // a resume takes the saved options
  const TrainResult resumed = train_unet(sd1(), data, rest, log, tmp.path() + "/split");
  EXPECT_EQ(resumed.losses, straight.losses);
  const io::TensorFile a = io::read_safetensors(straight.adapter_path), b = io::read_safetensors(resumed.adapter_path);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (const auto& [k, t] : a.tensors) EXPECT_EQ(b.find(k)->to_vector(), t.to_vector()) << k;

  // A block checkpoint cannot continue as a UNet run, nor the reverse.
  TrainOptions block = rest;
  block.diffusion.enabled = false, block.steps = 8;
  EXPECT_THAT(error_of([&] { train_with(sd1(), 4, {}, block, log, tmp.path() + "/split"); }),
              HasSubstr("UNet (diffusion objective)"));
}

TEST(UNetTrain, DrawsAreSeededPerMicroBatch) {
  const DiffusionDraw a = draw_noise({3, 4, 5, 6}, 1000, 0.0, 7, 11), b = draw_noise({3, 4, 5, 6}, 1000, 0.0, 7, 11);
  EXPECT_EQ(a.noise.to_vector(), b.noise.to_vector());
  EXPECT_EQ(a.timesteps.to_vector(), b.timesteps.to_vector());
  EXPECT_NE(draw_noise({3, 4, 5, 6}, 1000, 0.0, 7, 12).noise.to_vector(), a.noise.to_vector());
  EXPECT_NE(draw_noise({3, 4, 5, 6}, 1000, 0.0, 8, 11).noise.to_vector(), a.noise.to_vector());
  for (double t : draw_noise({64, 1, 1, 1}, 10, 0.0, 1, 0).timesteps.to_vector()) {
    EXPECT_EQ(t, std::floor(t));
    EXPECT_GE(t, 0);
    EXPECT_LT(t, 10);
  }
  // The offset adds one value per (sample, channel): the noise minus the plain draw is constant over h, w.
  const DiffusionDraw off = draw_noise({2, 3, 4, 4}, 1000, 0.5, 7, 11), plain = draw_noise({2, 3, 4, 4}, 1000, 0.0, 7, 11);
  const std::vector<double> x = off.noise.to_vector(), y = plain.noise.to_vector();
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(x[i] - y[i], x[i / 16 * 16] - y[i / 16 * 16], 1e-6) << i;
  EXPECT_NE(x[0], y[0]);
}

TEST(UNetTrain, CustomDiffusionOnEveryAttn2) {
  TempDir tmp;
  auto model = sd1();
  TrainOptions o = unet_options(tmp.path() + "/cd", 2);
  o.adapter = "custom_diffusion", o.lr = 1e-4;
  std::ostringstream log;
  const TrainResult r = train_unet(model, sd1_data(2, false), o, log);
  int attn2 = 0;
  for (const auto& [name, p] : model->named_parameters())
    attn2 += name.size() > 17 && name.compare(name.size() - 17, 17, "attn2.to_k.weight") == 0;
  const io::TensorFile f = io::read_safetensors(r.adapter_path);
  ASSERT_GT(attn2, 2);
  EXPECT_EQ(f.tensors.size(), size_t(2 * attn2));
  EXPECT_NE(f.find("mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_v_custom_diffusion.weight"), nullptr);
}

TEST(UNetTrain, LoConAndTheBf16Path) {
  TempDir tmp;
  auto model = sd1();
  TrainOptions o = unet_options(tmp.path() + "/locon", 3);
  o.targets = {"to_q", "conv1", "conv2"}, o.precision = "bf16";
  std::ostringstream log;
  const TrainResult r = train_unet(model, sd1_data(2, true), o, log);
  for (double l : r.losses) EXPECT_TRUE(std::isfinite(l));
  const auto& modules = r.lora->adapter("default").modules();
  ASSERT_TRUE(modules.count("down_blocks.0.resnets.0.conv1"));
  EXPECT_EQ(modules.at("down_blocks.0.resnets.0.conv1").down.dim(), 4);
  const io::TensorFile f = io::read_safetensors(r.adapter_path);
  const Tensor* down = f.find("unet.down_blocks.0.resnets.0.conv1.lora_A.weight");
  ASSERT_NE(down, nullptr);
  EXPECT_EQ(down->dtype(), DType::F32);  // the adapter is saved in f32 whatever the precision
  EXPECT_EQ(down->dim(), 4);
}

// SDXL's text_time conditioning goes through the whole run (text_embeds (N, 8), time_ids (N, 6)).
TEST(UNetTrain, SdxlWithTextTime) {
  TempDir tmp;
  const std::string dir = std::string(LOOM_UNET_FIXTURE_DIR) + "/sdxl";
  auto model = unet::load_unet_dir(dir).model;
  Generator gen(4);
  DiffusionData d;
  d.latents = Tensor::randn({2, 4, 6, 10}, gen);
  d.encoder_hidden_states = Tensor::randn({2, 3, 12}, gen);
  d.text_embeds = Tensor::randn({2, 8}, gen);
  d.time_ids = Tensor::from_values({64, 80, 0, 0, 64, 80, 32, 48, 4, 2, 32, 40}, {2, 6});
  d.check_fits(model->config(), {}, "sdxl data");
  TrainOptions o = unet_options(tmp.path() + "/sdxl", 2);
  o.batch_size = 2, o.diffusion.snr_gamma = 5.0;
  std::ostringstream log;
  const TrainResult r = train_unet(model, d, o, log);
  ASSERT_EQ(r.losses.size(), 2u);
  for (double l : r.losses) EXPECT_TRUE(std::isfinite(l));
  EXPECT_NE(io::read_safetensors(r.adapter_path)
                .find("unet.down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k.lora_A.weight"),
            nullptr);
}

TEST(UNetTrain, DataErrorsNameTheFileAndTheTensor) {
  TempDir tmp;
  const std::string path = tmp.path() + "/d.safetensors";
  Generator gen(1);
  io::write_safetensors(path, {{"latents", Tensor::randn({2, 4, 8, 8}, gen)}});
  EXPECT_THAT(error_of([&] { DiffusionData::load(path); }), AllOf(HasSubstr(path), HasSubstr("'encoder_hidden_states'")));
  io::write_safetensors(path, {{"latents", Tensor::randn({2, 4, 8, 8}, gen)},
                               {"encoder_hidden_states", Tensor::randn({2, 5, 12}, gen)},
                               {"noise", Tensor::randn({2, 4, 8, 7}, gen)}});
  EXPECT_THAT(error_of([&] { DiffusionData::load(path); }), AllOf(HasSubstr(path), HasSubstr("'noise'"), HasSubstr("[2, 4, 8, 7]")));
  io::write_safetensors(path, {{"latents", Tensor::randn({2, 3, 8, 8}, gen)},
                               {"encoder_hidden_states", Tensor::randn({2, 5, 10}, gen)},
                               {"timesteps", Tensor::from_values({1, 1000}, {2})}});
  const DiffusionData d = DiffusionData::load(path);
  const auto config = sd1()->config();
  EXPECT_THAT(error_of([&] { d.check_fits(config, {}, path); }), AllOf(HasSubstr(path), HasSubstr("'latents' has 3 channels")));
  DiffusionData e = d;
  e.latents = Tensor::randn({2, 4, 8, 8}, gen);
  EXPECT_THAT(error_of([&] { e.check_fits(config, {}, path); }), HasSubstr("'encoder_hidden_states' has width 10"));
  e.encoder_hidden_states = Tensor::randn({2, 5, 12}, gen);
  EXPECT_THAT(error_of([&] { e.check_fits(config, {}, path); }), AllOf(HasSubstr("'timesteps' holds 1000"), HasSubstr("[0, 1000)")));
  e.timesteps = Tensor();
  e.text_embeds = Tensor::randn({2, 8}, gen), e.time_ids = Tensor::randn({2, 6}, gen);
  EXPECT_THAT(error_of([&] { e.check_fits(config, {}, path); }), HasSubstr("no text_time embedding"));
  const auto sdxl = unet::load_unet_dir(std::string(LOOM_UNET_FIXTURE_DIR) + "/sdxl").model->config();
  e.text_embeds = Tensor(), e.time_ids = Tensor();
  EXPECT_THAT(error_of([&] { e.check_fits(sdxl, {}, path); }), HasSubstr("missing tensor 'text_embeds'"));
}

}  // namespace
}  // namespace loom::trainer
