// Device and precision where users reach them (SPEC §7), through the programs themselves:
// --device / --precision on the three example programs (the first stderr line, a device that is
// not there is exit 2 naming it, the CPU's bf16 / f16 runs), and f16 dynamic loss scaling in
// `loom train` (a step whose scaled gradients overflow is skipped and logged with the new
// scale, leaves the adapter untouched, and a resume continues with the saved scale); and
// `loom train --save-dtype` (the adapter file in bf16 / f16, reloadable).
#include "tests/cli/cli_fixture.h"
#include "tensor/backend.h"

#ifndef LOOM_EXAMPLES_DIR
#error "LOOM_EXAMPLES_DIR (where the example programs are built) must be defined by CMake"
#endif

namespace loom {
namespace {

class CliPrecision : public Cli {
 protected:
  Result example(const std::string& name, const std::vector<std::string>& args) const {
    return run_program(std::string(LOOM_EXAMPLES_DIR) + "/" + name, args, dir_for_calls());
  }
  std::string dir_for_calls() const { return path(""); }
  // `loom train` on model/ and `data` into `out` for `steps` steps, quiet, extra flags appended.
  Result train_steps(const std::string& out, int steps, const std::string& data, std::vector<std::string> extra) const {
    std::vector<std::string> args{"train", "--model", path("model"), "--data", path(data), "--out", path(out),
                                  "--steps", std::to_string(steps), "--batch-size", "2", "--quiet"};
    args.insert(args.end(), extra.begin(), extra.end());
    return loom(args);
  }
};

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// A device index that is not there: cuda without a GPU, else one past the last GPU.
std::string missing_cuda_device() {
  const int n = cuda_device_count();
  return n == 0 ? "cuda" : "cuda:" + std::to_string(n);
}

const char* const kExamples[] = {"train_lora", "train_custom_diffusion", "run_two_adapters"};

TEST_F(CliPrecision, ExamplesSayDeviceAndPrecisionFirstAsLoomTrainDoes) {
  standard_fixtures();
  const Result train = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--out",
                             path("t"), "--steps", "1", "--quiet", "--device", "cpu", "--precision", "bf16"});
  ASSERT_EQ(train.code, 0) << train;
  const std::string want = "loom: device cpu, precision bf16 (weights and activations bf16; adapter weights, "
                           "gradients and optimizer state f32)";
  EXPECT_EQ(first_line(train.err), want);
  for (const char* name : kExamples) {
    SCOPED_TRACE(name);
    std::vector<std::string> args{"--device", "cpu", "--precision", "bf16"};
    if (std::string(name) != "run_two_adapters") args.push_back(path(std::string(name) + ".safetensors"));
    const Result r = example(name, args);
    EXPECT_EQ(r.code, 0) << r;
    EXPECT_EQ(first_line(r.err), want) << r;
  }
}

TEST_F(CliPrecision, ExamplesDefaultToAutoAndAcceptTheEqualsForm) {
  const Result r = example("run_two_adapters", {"--device=cpu"});
  EXPECT_EQ(r.code, 0) << r;
  EXPECT_EQ(first_line(r.err), "loom: device cpu, precision f32") << r;
  if (!cuda_available()) {  // auto is the CPU here
    const Result a = example("run_two_adapters", {});
    EXPECT_EQ(a.code, 0) << a;
    EXPECT_EQ(first_line(a.err), "loom: device cpu, precision f32") << a;
  }
}

TEST_F(CliPrecision, ExamplesRefuseAMissingDeviceWithCode2NamingIt) {
  const std::string device = missing_cuda_device();
  for (const char* name : kExamples) {
    SCOPED_TRACE(name);
    const Result r = example(name, {"--device", device});
    EXPECT_EQ(r.code, 2) << r;
    EXPECT_THAT(r.err, AllOf(HasSubstr("--device"), HasSubstr(device), HasSubstr("usage:"))) << r;
    EXPECT_THAT(r.err, Not(HasSubstr("loom: device"))) << r;  // nothing announced, nothing run
  }
}

TEST_F(CliPrecision, ExamplesRefuseBadFlagsWithCode2) {
  for (const char* name : kExamples) {
    SCOPED_TRACE(name);
    Result r = example(name, {"--precision", "f8"});
    EXPECT_EQ(r.code, 2) << r;
    EXPECT_THAT(r.err, AllOf(HasSubstr("--precision"), HasSubstr("f8"))) << r;
    r = example(name, {"--device"});
    EXPECT_EQ(r.code, 2) << r;
    EXPECT_THAT(r.err, HasSubstr("--device needs a value")) << r;
    r = example(name, {"--devcie", "cpu"});
    EXPECT_EQ(r.code, 2) << r;
    EXPECT_THAT(r.err, HasSubstr("unknown flag --devcie")) << r;
  }
}

TEST_F(CliPrecision, ExamplesTrainInF16OnTheCpu) {
  for (const char* name : {"train_lora", "train_custom_diffusion"}) {
    SCOPED_TRACE(name);
    const Result r = example(name, {"--device", "cpu", "--precision", "f16", path(std::string(name) + ".safetensors")});
    EXPECT_EQ(r.code, 0) << r;
    EXPECT_THAT(first_line(r.err), HasSubstr("precision f16")) << r;
    EXPECT_TRUE(exists(path(std::string(name) + ".safetensors")));
  }
}

// ---- f16 dynamic loss scaling in `loom train` ------------------------------------------------------

// Data whose targets are ~1000: the f32 loss is finite (~1e6), but its gradient times the loss
// scale 2^16 exceeds f16's largest value (65504) in the model's f16 backward.
void write_large_target_data(const std::string& path) {
  Generator gen(7);
  const Shape hs{6, 8, 4, 4};
  io::write_safetensors(path, {{"hidden_states", Tensor::randn(hs, gen)},
                               {"encoder_hidden_states", Tensor::randn({6, 5, 6}, gen)},
                               {"target", Tensor::randn(hs, gen, DType::F32, Device::cpu(), 0.0, 1000.0)}});
}

double checkpoint_scale(const std::string& path) {
  const io::Checkpoint c = io::load_checkpoint(path);
  auto it = c.optimizer.find("grad_scaler.scale");
  return it == c.optimizer.end() ? -1.0 : it->second.item();
}

TEST_F(CliPrecision, F16OverflowSkipsTheStepLogsItAndHalvesTheScale) {
  write_model_dir(path("model"));
  write_large_target_data(path("big.safetensors"));
  const Result one = train_steps("one", 1, "big.safetensors", {"--device", "cpu", "--precision", "f16"});
  ASSERT_EQ(one.code, 0) << one;
  EXPECT_THAT(one.err, HasSubstr("step 1: the gradients hold inf or nan at loss scale 65536; the optimizer step is "
                                 "skipped, loss scale now 32768"))
      << one;
  // The skipped step left the adapter as it was made: B = 0 (and Adam has taken no step).
  const io::Checkpoint c = io::load_checkpoint(path("one/checkpoint.h5"));
  EXPECT_EQ(c.step, 1);
  int checked = 0;
  for (const auto& [name, t] : c.adapter) {
    if (name.find("lora_B") == std::string::npos) continue;
    ++checked;
    for (double v : t.to_vector()) ASSERT_EQ(v, 0.0) << name;
  }
  EXPECT_GT(checked, 0);
  EXPECT_EQ(checkpoint_scale(path("one/checkpoint.h5")), 32768.0);

  // Later steps run at the reduced scale: the scale only falls while steps overflow, and some
  // steps of a longer run are taken (the adapter moves).
  const Result more = train_steps("more", 12, "big.safetensors", {"--device", "cpu", "--precision", "f16"});
  ASSERT_EQ(more.code, 0) << more;
  const double scale = checkpoint_scale(path("more/checkpoint.h5"));
  EXPECT_LT(scale, 65536.0);
  EXPECT_GT(scale, 0.0);
  size_t skipped = 0;
  for (size_t at = more.err.find("optimizer step is skipped"); at != std::string::npos;
       at = more.err.find("optimizer step is skipped", at + 1))
    ++skipped;
  EXPECT_GE(skipped, 1u);
  EXPECT_LT(skipped, 12u) << more;
  EXPECT_EQ(scale, 65536.0 / double(1 << skipped));  // halved once per skip, no growth in 12 steps
  bool moved = false;
  for (const auto& [name, t] : io::load_checkpoint(path("more/checkpoint.h5")).adapter)
    if (name.find("lora_B") != std::string::npos)
      for (double v : t.to_vector()) moved = moved || v != 0.0;
  EXPECT_TRUE(moved);
}

TEST_F(CliPrecision, F16ResumeContinuesWithTheSavedLossScale) {
  write_model_dir(path("model"));
  write_large_target_data(path("big.safetensors"));
  const std::vector<std::string> f16{"--device", "cpu", "--precision", "f16", "--seed", "3"};
  const Result straight = train_steps("straight", 10, "big.safetensors", f16);
  ASSERT_EQ(straight.code, 0) << straight;
  const Result first = train_steps("split", 5, "big.safetensors", f16);
  ASSERT_EQ(first.code, 0) << first;
  const double mid_scale = checkpoint_scale(path("split/checkpoint.h5"));
  EXPECT_LT(mid_scale, 65536.0);  // the first half skipped steps: a fresh scale would differ
  const Result rest = loom({"train", "--model", path("model"), "--data", path("big.safetensors"), "--resume",
                            path("split"), "--steps", "10", "--quiet", "--device", "cpu", "--precision", "f16"});
  ASSERT_EQ(rest.code, 0) << rest;
  EXPECT_EQ(read_bytes(path("split/loss.csv")), read_bytes(path("straight/loss.csv")));
  EXPECT_EQ(checkpoint_scale(path("split/checkpoint.h5")), checkpoint_scale(path("straight/checkpoint.h5")));
  const io::TensorFile a = io::read_safetensors(path("split/adapter.safetensors"));
  const io::TensorFile b = io::read_safetensors(path("straight/adapter.safetensors"));
  ASSERT_FALSE(b.tensors.empty());
  for (const auto& [name, t] : b.tensors) {
    const Tensor* u = a.find(name);
    ASSERT_NE(u, nullptr) << name;
    EXPECT_EQ(u->to_vector(), t.to_vector()) << name;
  }
}

TEST_F(CliPrecision, Bf16AndF32RunsKeepNoLossScale) {
  standard_fixtures();
  for (const char* precision : {"f32", "bf16"}) {
    SCOPED_TRACE(precision);
    const std::string out = std::string("p_") + precision;
    const Result r = train_steps(out, 2, "data.safetensors", {"--device", "cpu", "--precision", precision});
    ASSERT_EQ(r.code, 0) << r;
    EXPECT_THAT(r.err, Not(HasSubstr("loss scale"))) << r;
    EXPECT_EQ(checkpoint_scale(path(out + "/checkpoint.h5")), -1.0);
  }
}

// ---- --save-dtype ------------------------------------------------------------------------------------

TEST_F(CliPrecision, SaveDtypeWritesTheAdapterInThatDtypeAndItReloads) {
  standard_fixtures();
  const std::vector<std::string> common{"--lr", "0.02", "--seed", "4", "--device", "cpu"};
  auto with = [&](std::vector<std::string> extra) {
    extra.insert(extra.end(), common.begin(), common.end());
    return extra;
  };
  ASSERT_EQ(train("f32", with({})).code, 0);
  const io::TensorFile f32 = io::read_safetensors(path("f32/adapter.safetensors"));
  ASSERT_FALSE(f32.tensors.empty());
  for (const auto& [name, t] : f32.tensors) EXPECT_EQ(t.dtype(), DType::F32) << name;  // the default
  const Tensor out_f32 = run("out_f32.safetensors", {"--adapter", path("f32/adapter.safetensors"), "--device", "cpu"});
  for (DType dtype : {DType::BF16, DType::F16}) {
    const std::string name = dtype_name(dtype);
    SCOPED_TRACE(name);
    const Result r = train(name, with({"--save-dtype", name}));
    ASSERT_EQ(r.code, 0) << r;
    const io::TensorFile low = io::read_safetensors(path(name + "/adapter.safetensors"));
    ASSERT_EQ(low.tensors.size(), f32.tensors.size());
    for (const auto& [key, t] : f32.tensors) {
      const Tensor* u = low.find(key);
      ASSERT_NE(u, nullptr) << key;
      EXPECT_EQ(u->dtype(), dtype) << key;
      // The same training (f32 masters), rounded once when written.
      EXPECT_EQ(u->to_vector(), t.to(dtype).to_vector()) << key;
    }
    // The file reloads (into f32 masters) and gives nearly the f32 adapter's output.
    const Tensor out = run("out_" + name + ".safetensors", {"--adapter", path(name + "/adapter.safetensors"),
                                                            "--device", "cpu"});
    ASSERT_TRUE(out.defined() && out_f32.defined());
    EXPECT_LE(rel_error(out, out_f32), 1e-2);
    // The checkpoint keeps the f32 masters whatever the file's dtype.
    for (const auto& [key, t] : io::load_checkpoint(path(name + "/checkpoint.h5")).adapter)
      EXPECT_EQ(t.dtype(), DType::F32) << key;
  }
}

TEST_F(CliPrecision, SaveDtypeErrorsAreUsageErrors) {
  standard_fixtures();
  Result r = train("bad", {"--save-dtype", "f8"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("--save-dtype"), HasSubstr("f8"))) << r;
  r = train("cd", {"--adapter", "custom_diffusion", "--save-dtype", "bf16"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--save-dtype bf16 is for LoRA adapters")) << r;
}

// ---- --no-cuda-graph (CUDA graphs: trainer/step_graph.h) --------------------------------------------

TEST_F(CliPrecision, NoCudaGraphIsAcceptedAndChangesNothingOnTheCpu) {
  standard_fixtures();
  const Result with = train_steps("g_on", 3, "data.safetensors", {"--device", "cpu"});
  const Result without = train_steps("g_off", 3, "data.safetensors", {"--device", "cpu", "--no-cuda-graph"});
  ASSERT_EQ(with.code, 0) << with;
  ASSERT_EQ(without.code, 0) << without;
  EXPECT_EQ(read_bytes(path("g_on/loss.csv")), read_bytes(path("g_off/loss.csv")));
  EXPECT_EQ(read_bytes(path("g_on/adapter.safetensors")), read_bytes(path("g_off/adapter.safetensors")));
  const Result run = loom({"run", "--model", path("model"), "--input", path("data.safetensors"), "--output",
                           path("out.safetensors"), "--device", "cpu", "--no-cuda-graph"});
  ASSERT_EQ(run.code, 0) << run;
  // The CPU has no graphs: not a word about them, with the flag or without.
  for (const Result* r : {&with, &without, &run}) EXPECT_THAT(r->err, Not(HasSubstr("CUDA graph"))) << *r;
}

// --deterministic (SPEC §7) on train and run: said on the first stderr line, nothing changes on the
// CPU (always repeatable); on CUDA two training runs with it write the same bytes.
TEST_F(CliPrecision, DeterministicIsSaidAndChangesNothingOnTheCpu) {
  standard_fixtures();
  const Result det = train_steps("d_on", 3, "data.safetensors", {"--device", "cpu", "--deterministic"});
  const Result plain = train_steps("d_off", 3, "data.safetensors", {"--device", "cpu"});
  ASSERT_EQ(det.code, 0) << det;
  ASSERT_EQ(plain.code, 0) << plain;
  EXPECT_THAT(first_line(det.err), HasSubstr(", deterministic kernels")) << det;
  EXPECT_THAT(first_line(plain.err), Not(HasSubstr("deterministic"))) << plain;
  EXPECT_EQ(read_bytes(path("d_on/adapter.safetensors")), read_bytes(path("d_off/adapter.safetensors")));
  const Result run = loom({"run", "--model", path("model"), "--input", path("data.safetensors"), "--output",
                           path("det.safetensors"), "--device", "cpu", "--deterministic"});
  ASSERT_EQ(run.code, 0) << run;
  EXPECT_THAT(first_line(run.err), HasSubstr(", deterministic kernels")) << run;
}

TEST_F(CliPrecision, OnCudaDeterministicTrainingRepeatsBitForBit) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0";
  standard_fixtures();
  for (const char* out : {"cd_1", "cd_2"}) {
    const Result r = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--out", path(out),
                           "--steps", "4", "--batch-size", "2", "--device", "cuda", "--deterministic", "--quiet"});
    ASSERT_EQ(r.code, 0) << r;
  }
  EXPECT_EQ(read_bytes(path("cd_1/loss.csv")), read_bytes(path("cd_2/loss.csv")));
  EXPECT_EQ(read_bytes(path("cd_1/adapter.safetensors")), read_bytes(path("cd_2/adapter.safetensors")));
}

// On a GPU the run says whether graphs are used, and the numbers are those of the eager run (4 steps:
// 2 eager warm-up steps, then 2 replayed).
TEST_F(CliPrecision, OnCudaTheRunSaysWhetherGraphsAreUsed) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0";
  standard_fixtures();
  const Result on = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--out",
                          path("c_on"), "--steps", "4", "--batch-size", "2", "--device", "cuda"});
  const Result off = loom({"train", "--model", path("model"), "--data", path("data.safetensors"), "--out",
                           path("c_off"), "--steps", "4", "--batch-size", "2", "--device", "cuda", "--no-cuda-graph"});
  ASSERT_EQ(on.code, 0) << on;
  ASSERT_EQ(off.code, 0) << off;
  EXPECT_THAT(on.err, HasSubstr("CUDA graphs on")) << on;
  EXPECT_THAT(off.err, HasSubstr("CUDA graphs off (--no-cuda-graph)")) << off;
  EXPECT_EQ(read_bytes(path("c_on/loss.csv")), read_bytes(path("c_off/loss.csv")));
}

}  // namespace
}  // namespace loom
