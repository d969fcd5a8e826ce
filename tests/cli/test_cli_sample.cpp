// `loom sample` (SPEC §8) run as a separate process on the tiny UNets of tests/unet/fixtures:
// the written latents equal the library call (trainer::sample_model) and follow diffusers'
// f64 goldens; seeded noise, adapters at weights, HDF5 output, an SDXL-like UNet with
// --scheduler-config; and every kind of bad input with its exit code and message (ctest -L cli).
#include "tests/cli/cli_fixture.h"
#include "tests/cli/unet_fixture.h"
#include "trainer/sample.h"

#include "adapters/lora.h"
#include "io/adapter_io.h"
#include "unet/unet_io.h"

namespace loom {
namespace {

class CliSample : public Cli {
 protected:
  // The conditioning (and, with a case name, that case's latents) of <model>_sampling.safetensors,
  // written as an input file; `drop` leaves keys out, `extra` adds some.
  std::string write_input(const std::string& file, const std::string& model, const std::string& latents_case,
                          const std::vector<std::string>& drop = {},
                          std::vector<std::pair<std::string, Tensor>> extra = {}) {
    const io::TensorFile g = io::read_tensor_file(unet_fixture("sampling/" + model + "_sampling.safetensors"));
    std::vector<std::pair<std::string, Tensor>> t;
    for (const auto& [k, v] : g.tensors) {
      const bool cond = k.find('.') == std::string::npos;
      const bool wanted = cond || k == latents_case + ".latents";
      if (wanted && std::find(drop.begin(), drop.end(), cond ? k : "latents") == drop.end())
        t.emplace_back(cond ? k : "latents", v.to(DType::F32));
    }
    for (auto& e : extra) t.push_back(std::move(e));
    io::write_safetensors(path(file), t);
    return path(file);
  }
  static Tensor golden(const std::string& model, const std::string& key) {
    return io::read_tensor_file(unet_fixture("sampling/" + model + "_sampling.safetensors")).find(key)->to(DType::F64);
  }
  static Tensor latents_of(const std::string& file) {
    const io::TensorFile f = io::read_tensor_file(file);
    const Tensor* t = f.find("latents");
    EXPECT_NE(t, nullptr) << file << " has no latents";
    return t ? *t : Tensor();
  }
  Result sample(const std::string& input, const std::string& output, std::vector<std::string> extra,
                const std::string& model = "sd1") const {
    std::vector<std::string> args{"sample", "--model", unet_fixture(model), "--input", input, "--output", path(output),
                                  "--device", "cpu"};
    args.insert(args.end(), extra.begin(), extra.end());
    return loom(args);
  }
  static trainer::SampleOptions options(const std::string& scheduler, int64_t steps, const std::string& model = "sd1") {
    trainer::SampleOptions o;
    o.model_dir = unet_fixture(model);
    o.scheduler = scheduler;
    o.steps = steps;
    return o;
  }
};

TEST_F(CliSample, WritesWhatTheLibraryComputesAndFollowsDiffusers) {
  const std::string in = write_input("in.safetensors", "sd1", "dpmpp_2m");
  const Result r = sample(in, "out.safetensors", {"--steps", "4", "--scheduler", "dpmpp_2m", "--guidance-scale", "7.5"});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.err, HasSubstr("device cpu"));
  EXPECT_THAT(r.err, HasSubstr("step 4/4"));
  EXPECT_THAT(r.err, HasSubstr("ETA"));
  EXPECT_THAT(r.out, HasSubstr("wrote " + path("out.safetensors") + ": latents [2, 4, 8, 8]"));
  const Tensor cli = latents_of(path("out.safetensors"));
  const trainer::SampleResult lib =
      trainer::sample_model(options("dpmpp_2m", 4), trainer::SampleInputs::load(in), in);
  EXPECT_EQ(rel_error(cli, lib.latents), 0.0);
  EXPECT_LE(rel_error(cli.to(DType::F64), golden("sd1", "dpmpp_2m.output")), 1e-4);

  // --quiet: no progress lines; HDF5 output by extension
  const Result q = sample(in, "out.h5", {"--steps", "4", "--scheduler", "dpmpp_2m", "--quiet"});
  ASSERT_EQ(q.code, 0) << q;
  EXPECT_THAT(q.err, Not(HasSubstr("step 1/4")));
  ASSERT_TRUE(exists(path("out.h5")));
  EXPECT_EQ(io::detect_format(path("out.h5")), io::FileFormat::Hdf5);
  EXPECT_EQ(rel_error(latents_of(path("out.h5")), cli), 0.0);

  // --no-cuda-graph is accepted anywhere (the CPU has no graphs: the same numbers, no replay line)
  const Result e = sample(in, "eager.safetensors", {"--steps", "4", "--scheduler", "dpmpp_2m", "--no-cuda-graph"});
  ASSERT_EQ(e.code, 0) << e;
  EXPECT_THAT(e.err, Not(HasSubstr("replayed")));
  EXPECT_EQ(rel_error(latents_of(path("eager.safetensors")), cli), 0.0);
  EXPECT_THAT(loom({"sample", "--help"}).out, HasSubstr("--no-cuda-graph"));
}

TEST_F(CliSample, SdxlLikeUNetWithSchedulerConfigFile) {
  const std::string in = write_input("in.safetensors", "sdxl", "euler", {}, {{"pooled_extra", Tensor::zeros({1})}});
  const Result r = sample(in, "out.safetensors",
                          {"--steps", "4", "--scheduler", "euler", "--scheduler-config",
                           unet_fixture("sampling/sdxl_scheduler_config.json")},
                          "sdxl");
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.err, HasSubstr("not used by loom sample: pooled_extra"));   // no key dropped without a word
  EXPECT_THAT(r.err, HasSubstr("not used by EulerDiscreteScheduler: clip_sample"));
  EXPECT_LE(rel_error(latents_of(path("out.safetensors")).to(DType::F64), golden("sdxl", "euler.output")), 1e-4);
}

TEST_F(CliSample, SeededNoiseIsReproducibleAndScaledByInitNoiseSigma) {
  const std::string in = write_input("in.safetensors", "sd1", "", {"latents"});
  const std::vector<std::string> flags{"--steps", "3", "--scheduler", "euler", "--seed", "3", "--height", "48",
                                       "--width", "40"};
  const Result a = sample(in, "a.safetensors", flags);
  ASSERT_EQ(a.code, 0) << a;
  EXPECT_THAT(a.out, HasSubstr("latents [2, 4, 6, 5]"));
  ASSERT_EQ(sample(in, "b.safetensors", flags).code, 0);
  EXPECT_EQ(rel_error(latents_of(path("a.safetensors")), latents_of(path("b.safetensors"))), 0.0);
  std::vector<std::string> other = flags;
  other[5] = "4";
  ASSERT_EQ(sample(in, "c.safetensors", other).code, 0);
  EXPECT_GT(rel_error(latents_of(path("a.safetensors")), latents_of(path("c.safetensors"))), 1e-3);

  trainer::SampleOptions o = options("euler", 3);
  o.seed = 3, o.height = 48, o.width = 40;
  const trainer::SampleResult lib = trainer::sample_model(o, trainer::SampleInputs::load(in), in);
  EXPECT_EQ(rel_error(latents_of(path("a.safetensors")), lib.latents), 0.0);
  EXPECT_GT(lib.init_noise_sigma, 3.0);  // Euler, leading: √(σ_max² + 1) (σ_max ≈ 2.95 at t = 667)

  // Default size: the config's sample_size (8) latents
  const Result d = sample(in, "d.safetensors", {"--steps", "2"});
  ASSERT_EQ(d.code, 0) << d;
  EXPECT_THAT(d.out, HasSubstr("latents [2, 4, 8, 8]"));
}

TEST_F(CliSample, AdaptersApplyAtTheirWeights) {
  // A LoRA on the sd1 UNet's attention projections, with non-zero up weights.
  auto unet = unet::load_unet_dir(unet_fixture("sd1")).model;
  adapters::LoraSet set(unet);
  Generator gen(11);
  adapters::LoraConfig cfg;
  cfg.rank = 2;
  for (auto& [p, m] : set.add("style", cfg, gen).modules()) m.up.tensor().copy_(Tensor::randn(m.up.shape(), gen));
  io::save_lora(set.adapter("style"), *unet, path("style.safetensors"), io::KeyFamily::Peft);

  const std::string in = write_input("in.safetensors", "sd1", "ddim");
  ASSERT_EQ(sample(in, "plain.safetensors", {"--steps", "3"}).code, 0);
  const Result r = sample(in, "styled.safetensors", {"--steps", "3", "--adapter", path("style.safetensors") + ":0.5"});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.err, HasSubstr("style.safetensors"));  // the load report
  const Tensor styled = latents_of(path("styled.safetensors"));
  EXPECT_GT(rel_error(styled, latents_of(path("plain.safetensors"))), 1e-3);

  EXPECT_THAT(r.err, HasSubstr("LoRA adapters fused"));  // the default: fused once, before the first step

  trainer::SampleOptions o = options("ddim", 3);
  o.adapters.push_back(trainer::AdapterSpec::parse(path("style.safetensors") + ":0.5"));
  const trainer::SampleResult fused = trainer::sample_model(o, trainer::SampleInputs::load(in), in);
  EXPECT_TRUE(fused.fused);
  EXPECT_EQ(rel_error(styled, fused.latents), 0.0);

  // --no-fuse: the low-rank products at every step; the same function (f32 rounding apart)
  const Result u = sample(in, "unfused.safetensors",
                          {"--steps", "3", "--adapter", path("style.safetensors") + ":0.5", "--no-fuse"});
  ASSERT_EQ(u.code, 0) << u;
  EXPECT_THAT(u.err, Not(HasSubstr("LoRA adapters fused")));
  const Tensor unfused = latents_of(path("unfused.safetensors"));
  EXPECT_LE(rel_error(unfused, styled), 1e-5);
  o.fuse = false;
  const trainer::SampleResult lib_unfused = trainer::sample_model(o, trainer::SampleInputs::load(in), in);
  EXPECT_FALSE(lib_unfused.fused);
  EXPECT_EQ(rel_error(unfused, lib_unfused.latents), 0.0);
}

TEST_F(CliSample, BadInputsHaveNamedErrorsAndExitCodes) {
  const std::string in = write_input("in.safetensors", "sd1", "ddim");
  const std::string no_latents = write_input("nolat.safetensors", "sd1", "", {"latents"});
  const std::string no_neg = write_input("noneg.safetensors", "sd1", "ddim", {"negative_encoder_hidden_states"});
  const std::string no_ehs = write_input("noehs.safetensors", "sd1", "ddim", {"encoder_hidden_states"});
  write_bytes(path("bad_sched.json"), R"({"solver_order": 3})");
  write_bytes(path("garbage.safetensors"), "not a tensor file at all");
  const struct {
    std::vector<std::string> args;
    int code;
    const char* message;
    std::string input;
    std::string model = "sd1";
  } cases[] = {
      {{"--scheduler", "pndm"}, 2, "--scheduler: scheduler 'pndm' is not one of ddim, euler, dpmpp_2m", in},
      {{"--steps", "0"}, 2, "--steps must be at least 1, got 0", in},
      {{"--guidance-scale", "nan"}, 2, "--guidance-scale must be a finite number", in},
      {{"--seed", "1"}, 2, "the input file holds latents", in},
      {{"--height", "50"}, 2, "--height must be a positive multiple of 8", no_latents},
      {{"--adapter", path("missing.safetensors") + ":x"}, 2, "is not a finite number", in},
      {{"--steps", "1000", "--scheduler", "ddim"}, 2, "--steps 1000", in},
      {{}, 3, "negative_encoder_hidden_states is missing: guidance scale 7.5 > 1", no_neg},
      {{"--guidance-scale", "1"}, 0, "wrote", no_neg},
      {{}, 3, "no tensor 'encoder_hidden_states'", no_ehs},
      {{}, 3, "missing_input.safetensors", path("missing_input.safetensors")},
      {{}, 3, "garbage.safetensors", path("garbage.safetensors")},
      {{"--scheduler", "dpmpp_2m", "--scheduler-config", path("bad_sched.json")}, 3, "bad_sched.json: key 'solver_order'", in},
      {{"--scheduler-config", path("nope.json")}, 3, "nope.json: cannot be read", in},
      {{"--adapter", path("missing.safetensors")}, 3, "missing.safetensors", in},
      {{}, 3, "text_embeds is missing", in, "sdxl"},  // an SDXL-like UNet, an input without text_embeds
      {{}, 3, "no_such_model", in, "no_such_model"},
  };
  for (const auto& c : cases) {
    std::vector<std::string> args{"sample", "--model", unet_fixture(c.model), "--input", c.input, "--output",
                                  path("out.safetensors"), "--device", "cpu", "--quiet"};
    args.insert(args.end(), c.args.begin(), c.args.end());
    if (std::find(c.args.begin(), c.args.end(), "--steps") == c.args.end()) args.insert(args.end(), {"--steps", "2"});
    const Result r = loom(args);
    EXPECT_EQ(r.code, c.code) << r;
    EXPECT_THAT(r.all(), HasSubstr(c.message)) << r;
  }
  // A device that is not there (this build or machine has no cuda:7).
  const Result dev = loom({"sample", "--model", unet_fixture("sd1"), "--input", in, "--output", path("o.safetensors"),
                           "--device", "cuda:7"});
  EXPECT_EQ(dev.code, 2) << dev;
  EXPECT_THAT(dev.err, HasSubstr("cuda:7"));
  // The output may not replace the input.
  const Result same = sample(in, "in.safetensors", {});
  EXPECT_EQ(same.code, 2) << same;
  EXPECT_THAT(same.err, HasSubstr("is the --input file"));
  // Missing required flags are usage errors.
  EXPECT_EQ(loom({"sample", "--model", unet_fixture("sd1")}).code, 2);
}

}  // namespace
}  // namespace loom
