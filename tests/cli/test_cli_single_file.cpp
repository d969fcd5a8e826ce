// Single-file original checkpoints (`model.diffusion_model.…` keys, as A1111 / ComfyUI users hold
// them) with `--config` (SPEC §8), through the one loader every UNet command uses
// (unet::load_unet): `loom run`, `loom sample` and `loom train` give exactly what they give for the
// diffusers directory holding the same weights (tests/unet/fixtures/<name>/ldm_unet.safetensors,
// made from the directory's weights by make_ldm_fixtures.py and checked there by diffusers'
// convert_ldm_unet_checkpoint), and the errors name the file, the key or the flag.
#include "tests/cli/cli_fixture.h"
#include "tests/cli/unet_fixture.h"

namespace loom {
namespace {

std::string file_of(const std::string& name) { return unet_fixture(name + "/ldm_unet.safetensors"); }
std::string config_of(const std::string& name) { return unet_fixture(name + "/config.json"); }

class CliSingleFile : public Cli {
 protected:
  std::string run_inputs(const std::string& name) const {
    return write_golden_inputs(name, path(name + "_in.safetensors"));
  }
  static Tensor read_tensor(const std::string& file, const std::string& key) {
    const io::TensorFile f = io::read_tensor_file(file);
    const Tensor* t = f.find(key);
    EXPECT_NE(t, nullptr) << file << " has no " << key;
    return t ? *t : Tensor();
  }
};

TEST_F(CliSingleFile, RunGivesTheDirectorysOutputAndDiffusersNumbers) {
  for (const std::string name : {"sd2", "sdxl"}) {
    SCOPED_TRACE(name);
    const std::string in = run_inputs(name);
    const Result from_dir = loom({"run", "--model", unet_fixture(name), "--input", in, "--output", path("dir.safetensors")});
    ASSERT_EQ(from_dir.code, 0) << from_dir;
    const Result from_file = loom({"run", "--model", file_of(name), "--config", config_of(name), "--input", in,
                                   "--output", path("file.safetensors")});
    ASSERT_EQ(from_file.code, 0) << from_file;
    EXPECT_THAT(from_file.err, HasSubstr("skipped 1 keys of other models"));  // the VAE key, not dropped silently
    const Tensor y = read_output(path("file.safetensors"));
    EXPECT_EQ(rel_error(y, read_output(path("dir.safetensors"))), 0.0);
    EXPECT_LE(rel_error(y, golden_output(name)), 1e-4);
  }
}

TEST_F(CliSingleFile, SampleGivesTheDirectorysLatents) {
  // sdxl's conditioning of the sampling fixture (keys without a '.'), seeded starting noise
  const io::TensorFile g = io::read_tensor_file(unet_fixture("sampling/sdxl_sampling.safetensors"));
  std::vector<std::pair<std::string, Tensor>> cond;
  for (const auto& [k, t] : g.tensors)
    if (k.find('.') == std::string::npos) cond.emplace_back(k, t.to(DType::F32));
  io::write_safetensors(path("cond.safetensors"), cond);
  const std::vector<std::string> common{"--input", path("cond.safetensors"), "--steps", "3", "--scheduler",
                                        "dpmpp_2m", "--seed", "5", "--quiet", "--device", "cpu"};
  std::vector<std::string> a{"sample", "--model", unet_fixture("sdxl"), "--output", path("dir.safetensors")};
  std::vector<std::string> b{"sample", "--model", file_of("sdxl"), "--config", config_of("sdxl"), "--output",
                             path("file.safetensors")};
  a.insert(a.end(), common.begin(), common.end());
  b.insert(b.end(), common.begin(), common.end());
  const Result from_dir = loom(a), from_file = loom(b);
  ASSERT_EQ(from_dir.code, 0) << from_dir;
  ASSERT_EQ(from_file.code, 0) << from_file;
  EXPECT_EQ(rel_error(read_tensor(path("file.safetensors"), "latents"), read_tensor(path("dir.safetensors"), "latents")),
            0.0);
}

TEST_F(CliSingleFile, TrainAndResumeGiveTheDirectorysRun) {
  Generator gen(5);
  io::write_safetensors(path("data.safetensors"), {{"latents", Tensor::randn({4, 4, 8, 8}, gen)},
                                                   {"encoder_hidden_states", Tensor::randn({4, 5, 12}, gen)}});
  auto train = [&](const std::vector<std::string>& model, const std::string& out, const std::string& steps,
                   bool resume = false) {
    std::vector<std::string> args{"train", "--data", path("data.safetensors"), "--steps", steps, "--quiet"};
    args.insert(args.end(), model.begin(), model.end());
    if (resume) {
      args.insert(args.end(), {"--resume", path(out)});
    } else {
      args.insert(args.end(), {"--out", path(out), "--batch-size", "2", "--seed", "3", "--targets",
                               "to_q,to_v,conv1"});
    }
    return loom(args);
  };
  const std::vector<std::string> dir{"--model", unet_fixture("sd2")};
  const std::vector<std::string> file{"--model", file_of("sd2"), "--config", config_of("sd2")};
  const Result d = train(dir, "dir", "4");
  ASSERT_EQ(d.code, 0) << d;
  const Result f = train(file, "file", "2");
  ASSERT_EQ(f.code, 0) << f;
  EXPECT_THAT(f.err, HasSubstr("skipped 1 keys of other models"));
  const Result rest = train(file, "file", "4", true);
  ASSERT_EQ(rest.code, 0) << rest;
  EXPECT_EQ(read_bytes(path("file/loss.csv")), read_bytes(path("dir/loss.csv")));
  EXPECT_EQ(read_bytes(path("file/adapter.safetensors")), read_bytes(path("dir/adapter.safetensors")));
}

TEST_F(CliSingleFile, ErrorsNameTheFileTheKeyAndTheFlag) {
  const std::string in = run_inputs("sd2");
  auto run = [&](std::vector<std::string> model) {
    std::vector<std::string> args{"run", "--input", in, "--output", path("o.safetensors")};
    args.insert(args.end(), model.begin(), model.end());
    return loom(args);
  };
  // a single file without --config, for every command
  Result r = run({"--model", file_of("sd2")});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr(file_of("sd2")), HasSubstr("needs --config")));
  r = loom({"sample", "--model", file_of("sd2"), "--input", in, "--output", path("o.safetensors")});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, HasSubstr("needs --config"));
  // a directory with --config
  r = run({"--model", unet_fixture("sd2"), "--config", config_of("sd2")});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr(unet_fixture("sd2")), HasSubstr("is a directory")));
  // diffusers names, not an original checkpoint: the file and the prefix named
  r = run({"--model", unet_fixture("sd2") + "/diffusion_pytorch_model.safetensors", "--config", config_of("sd2")});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("diffusion_pytorch_model.safetensors"), HasSubstr("model.diffusion_model.")));
  // the wrong config: a key the model built from it does not have, named in both spellings
  r = run({"--model", file_of("sd2"), "--config", config_of("sdxl")});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr(file_of("sd2")), HasSubstr("'model.diffusion_model."), HasSubstr("wrong config")));
  // a missing key and a shape that differs from the config's
  std::vector<std::pair<std::string, Tensor>> missing, reshaped;
  for (const auto& [k, t] : io::read_tensor_file(file_of("sd2")).tensors) {
    if (k != "model.diffusion_model.out.2.bias") missing.emplace_back(k, t);
    reshaped.emplace_back(k, k == "model.diffusion_model.out.2.bias" ? Tensor::zeros({5}, DType::F64) : t);
  }
  io::write_safetensors(path("missing.safetensors"), missing);
  io::write_safetensors(path("reshaped.safetensors"), reshaped);
  r = run({"--model", path("missing.safetensors"), "--config", config_of("sd2")});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr(path("missing.safetensors")), HasSubstr("missing 'model.diffusion_model.out.2.bias'"),
                           HasSubstr("conv_out.bias")));
  r = run({"--model", path("reshaped.safetensors"), "--config", config_of("sd2")});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr(path("reshaped.safetensors")), HasSubstr("'model.diffusion_model.out.2.bias'"),
                           HasSubstr("[5]"), HasSubstr("[4]")));
  EXPECT_FALSE(exists(path("o.safetensors")));
}

}  // namespace
}  // namespace loom
