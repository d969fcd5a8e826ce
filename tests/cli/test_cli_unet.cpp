// `loom train --model UNET_DIR` (the diffusion objective, SPEC §8) and `loom train --builtin unet`
// as a user runs them: files written, determinism and exact resume, the NaN guard (exit 4), and
// the errors of bad data files (exit 3, naming the file and the tensor) and of flags that do not
// fit the model (exit 2).
#include "tests/cli/cli_fixture.h"
#include "tensor/ops.h"

namespace loom {
namespace {

const std::string kSd1 = std::string(LOOM_SOURCE_DIR) + "/tests/unet/fixtures/sd1";
const std::string kSdxl = std::string(LOOM_SOURCE_DIR) + "/tests/unet/fixtures/sdxl";

// Diffusion data for the sd1 fixture: latents (4,4,8,8), encoder_hidden_states (4,5,12), and
// `extra` tensors; `drop` names a tensor to leave out.
void write_unet_data(const std::string& path, std::vector<std::pair<std::string, Tensor>> extra = {},
                     const std::string& drop = "", double latent_scale = 1.0) {
  Generator gen(5);
  std::vector<std::pair<std::string, Tensor>> t;
  if (drop != "latents") t.emplace_back("latents", ops::mul_scalar(Tensor::randn({4, 4, 8, 8}, gen), latent_scale));
  if (drop != "encoder_hidden_states") t.emplace_back("encoder_hidden_states", Tensor::randn({4, 5, 12}, gen));
  for (auto& e : extra) t.push_back(std::move(e));
  io::write_safetensors(path, t);
}

class CliUnet : public Cli {
 protected:
  Result train_unet(const std::string& out, std::vector<std::string> extra = {},
                    const std::string& data = "unet.safetensors") const {
    std::vector<std::string> args{"train", "--model", kSd1,      "--data", path(data), "--out", path(out),
                                  "--steps", "4",    "--batch-size", "2", "--quiet"};
    args.insert(args.end(), extra.begin(), extra.end());
    return loom(args);
  }
};

TEST_F(CliUnet, TrainWritesTheAdapterAndIsDeterministic) {
  write_unet_data(path("unet.safetensors"));
  const std::vector<std::string> flags{"--snr-gamma", "5", "--noise-offset", "0.05", "--prediction-type", "v_prediction",
                                       "--seed", "3", "--device", "cpu"};
  const Result a = train_unet("a", flags), b = train_unet("b", flags);
  ASSERT_EQ(a.code, 0) << a;
  ASSERT_EQ(b.code, 0) << b;
  EXPECT_THAT(a.out, HasSubstr("trained 4 steps"));
  for (const char* f : {"adapter.safetensors", "checkpoint.h5", "loss.csv", "loss.png"}) EXPECT_TRUE(exists(path(std::string("a/") + f))) << f;
  EXPECT_EQ(read_bytes(path("a/loss.csv")), read_bytes(path("b/loss.csv")));
  const io::TensorFile f = io::read_safetensors(path("a/adapter.safetensors"));
  EXPECT_NE(f.find("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v.lora_A.weight"), nullptr);
  // The saved options: the UNet's default clipping (1) and the diffusion flags.
  const io::Checkpoint c = io::load_checkpoint(path("a/checkpoint.h5"));
  EXPECT_THAT(c.options_json, AllOf(HasSubstr("\"max_grad_norm\": 1.0"), HasSubstr("v_prediction"),
                                    HasSubstr("\"snr_gamma\": 5.0")));
  // Another seed draws other noise.
  const Result other = train_unet("c", {"--seed", "4"});
  ASSERT_EQ(other.code, 0) << other;
  EXPECT_NE(read_bytes(path("c/loss.csv")), read_bytes(path("a/loss.csv")));
}

TEST_F(CliUnet, ResumeEqualsAnUninterruptedRun) {
  write_unet_data(path("unet.safetensors"));
  auto run = [&](const std::string& out, const std::string& steps) {
    return loom({"train", "--model", kSd1, "--data", path("unet.safetensors"), "--out", path(out), "--steps", steps,
                 "--batch-size", "2", "--grad-accum", "2", "--seed", "11", "--quiet"});
  };
  const Result straight = run("straight", "6");
  ASSERT_EQ(straight.code, 0) << straight;
  const Result first = run("split", "3");
  ASSERT_EQ(first.code, 0) << first;
  const Result rest = loom({"train", "--model", kSd1, "--data", path("unet.safetensors"), "--resume", path("split"),
                            "--steps", "6", "--quiet"});
  ASSERT_EQ(rest.code, 0) << rest;
  EXPECT_EQ(read_bytes(path("split/loss.csv")), read_bytes(path("straight/loss.csv")));
  EXPECT_EQ(read_bytes(path("split/adapter.safetensors")), read_bytes(path("straight/adapter.safetensors")));
  // The diffusion flags are part of the run: a resume cannot change them.
  const Result changed = loom({"train", "--model", kSd1, "--data", path("unet.safetensors"), "--resume",
                               path("split"), "--steps", "8", "--snr-gamma", "1"});
  EXPECT_EQ(changed.code, 2) << changed;
  EXPECT_THAT(changed.err, HasSubstr("--snr-gamma cannot be given with --resume"));
}

// A single-file original checkpoint (model.diffusion_model.… keys) with --config.
TEST_F(CliUnet, TrainOnASingleFileCheckpointWithConfig) {
  const std::string sd2 = std::string(LOOM_SOURCE_DIR) + "/tests/unet/fixtures/sd2";
  write_unet_data(path("unet.safetensors"));
  const Result r = loom({"train", "--model", sd2 + "/ldm_unet.safetensors", "--config", sd2 + "/config.json", "--data",
                         path("unet.safetensors"), "--out", path("o"), "--steps", "1", "--quiet"});
  EXPECT_EQ(r.code, 0) << r;
  EXPECT_TRUE(exists(path("o/adapter.safetensors")));
}

TEST_F(CliUnet, BadDataFilesExitWithCode3NamingFileAndTensor) {
  write_unet_data(path("no_ctx.safetensors"), {}, "encoder_hidden_states");
  Result r = train_unet("o", {}, "no_ctx.safetensors");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr(path("no_ctx.safetensors")), HasSubstr("missing tensor 'encoder_hidden_states'")));
  write_unet_data(path("no_latents.safetensors"), {}, "latents");
  r = train_unet("o", {}, "no_latents.safetensors");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, HasSubstr("missing tensor 'latents'"));
  Generator gen(1);
  write_unet_data(path("noise.safetensors"), {{"noise", Tensor::randn({4, 4, 8, 6}, gen)}});
  r = train_unet("o", {}, "noise.safetensors");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr(path("noise.safetensors")), HasSubstr("'noise' has shape [4, 4, 8, 6]")));
  write_unet_data(path("t.safetensors"), {{"timesteps", Tensor::from_values({0, 1, 2}, {3, 1})}});
  r = train_unet("o", {}, "t.safetensors");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, HasSubstr("'timesteps' has shape [3, 1]"));
  write_unet_data(path("t2.safetensors"), {{"timesteps", Tensor::from_values({0, 1, 2, 999}, {4})}});
  r = train_unet("o", {"--num-train-timesteps", "500"}, "t2.safetensors");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("'timesteps' holds 999"), HasSubstr("--num-train-timesteps")));
  // SDXL: text_embeds and time_ids are needed.
  r = loom({"train", "--model", kSdxl, "--data", path("t2.safetensors"), "--out", path("x"), "--quiet"});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, HasSubstr("missing tensor 'text_embeds'"));
  EXPECT_FALSE(exists(path("o/adapter.safetensors")));
}

TEST_F(CliUnet, FlagsThatDoNotFitTheModelExitWithCode2) {
  write_unet_data(path("unet.safetensors"));
  Result r = train_unet("o", {"--prediction-type", "x0"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--prediction-type must be epsilon or v_prediction"));
  r = train_unet("o", {"--beta-schedule", "cosine"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--beta-schedule"));
  r = train_unet("o", {"--snr-gamma", "-1"});
  EXPECT_EQ(r.code, 2) << r;
  r = train_unet("o", {"--prefix", "down_blocks.0.attentions.0"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--prefix"));
  // A diffusion flag with a Transformer2DModel block.
  standard_fixtures();
  r = train("b", {"--snr-gamma", "5"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--snr-gamma is for a UNet --model"));
  r = loom({"train", "--builtin", "vae"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--builtin must be block or unet"));
}

TEST_F(CliUnet, NonFiniteLossStopsWithCode4) {
  // Finite latents whose v-prediction target overflows the f32 loss.
  write_unet_data(path("huge.safetensors"), {}, "", 1e30);
  const Result r = train_unet("o", {"--prediction-type", "v_prediction"}, "huge.safetensors");
  EXPECT_EQ(r.code, 4) << r;
  EXPECT_THAT(r.err, HasSubstr("step 1"));
  EXPECT_FALSE(exists(path("o/adapter.safetensors")));
}

// A short run of the built-in UNet task (its full length, the demo's, takes a minute on 2 cores):
// the whole path, the report, a reload that reproduces the trained model exactly, the loss falling.
TEST_F(CliUnet, BuiltinUnetTaskRunsAndReloadsExactly) {
  const Result r = loom({"train", "--builtin", "unet", "--out", path("bu"), "--quiet", "--device", "cpu", "--steps", "25"});
  ASSERT_TRUE(r.code == 0 || r.code == 1) << r;
  EXPECT_THAT(r.out, AllOf(HasSubstr("loom built-in UNet task"), HasSubstr("recovered"),
                           HasSubstr("reload check    0.00e+00 relative error"),
                           HasSubstr(r.code == 0 ? "built-in task: PASSED" : "built-in task: FAILED")));
  const std::string loss = r.out.substr(r.out.find("final loss"));
  const double percent = std::stod(loss.substr(loss.find('(') + 1));
  EXPECT_LT(percent, 50.0) << loss;
  // Its files are an ordinary UNet run's inputs.
  const Result again = loom({"train", "--model", path("bu/base_model"), "--data", path("bu/data.safetensors"), "--out",
                             path("again"), "--steps", "2", "--quiet"});
  EXPECT_EQ(again.code, 0) << again;
}

}  // namespace
}  // namespace loom
