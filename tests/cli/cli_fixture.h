// The fixture of the `loom` command-line tests (tests/cli/test_cli*.cpp): running the built
// executable as a separate process (no shell), and writing model directories and data files
// with the library.
#pragma once

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#include "attention/transformer.h"
#include "io/checkpoint.h"
#include "io/tensor_file.h"
#include "tensor/random.h"
#include "tensor/tensor.h"
#include "tests/test_helpers.h"

extern char** environ;

namespace loom {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;
using loom::testing::read_bytes;
using loom::testing::rel_error;
using loom::testing::write_bytes;

#ifndef LOOM_BIN
#error "LOOM_BIN (the path of the built loom executable) must be defined by CMake"
#endif

// ---- running the executable -------------------------------------------------------------------

bool exists(const std::string& path) { return fs::exists(path); }

struct Result {
  int code = -1;  // exit status; 128 + signal when killed by one
  std::string out, err;
  std::string all() const { return out + err; }
};

std::ostream& operator<<(std::ostream& os, const Result& r) {
  return os << "[exit " << r.code << "]\n--- stdout ---\n" << r.out << "--- stderr ---\n" << r.err;
}

// Runs the program `bin` with `args` (no shell: arguments are passed as they are), capturing
// stdout and stderr into files next to `scratch`; `env` ("NAME=value") is added to the
// environment.
Result run_program(const std::string& bin, const std::vector<std::string>& args, const std::string& scratch,
                   const std::vector<std::string>& env = {}) {
  static int counter = 0;
  const std::string stem = scratch + "/.loom_call_" + std::to_string(counter++);
  const std::string out_path = stem + ".out", err_path = stem + ".err";
  std::vector<std::string> all{bin};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = 0;
  Result r;
  std::vector<std::string> env_strings = env;
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  for (char** e = environ; *e; ++e) envp.push_back(*e);
  envp.push_back(nullptr);
  const int rc = posix_spawn(&pid, bin.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    r.err = "posix_spawn failed: " + std::string(std::strerror(rc));
    return r;
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status)) r.code = WEXITSTATUS(status);
  else if (WIFSIGNALED(status)) r.code = 128 + WTERMSIG(status);
  r.out = read_bytes(out_path), r.err = read_bytes(err_path);
  fs::remove(out_path), fs::remove(err_path);
  return r;
}

// run_program for the `loom` executable.
Result run_loom(const std::vector<std::string>& args, const std::string& scratch,
                const std::vector<std::string>& env = {}) {
  return run_program(LOOM_BIN, args, scratch, env);
}

// ---- numbers ------------------------------------------------------------------------------------

// The 'output' tensor of a `loom run` output file (safetensors or HDF5).
Tensor read_output(const std::string& path) {
  const io::TensorFile f = io::read_tensor_file(path);
  const Tensor* t = f.find("output");
  return t ? *t : Tensor();
}

// ---- fixtures -----------------------------------------------------------------------------------

struct ModelSpec {
  int64_t in_channels = 8, heads = 2, head_dim = 4, cross_attention_dim = 6, norm_num_groups = 2;
  uint64_t seed = 1;
};

std::string config_json(const ModelSpec& s) {
  std::ostringstream os;
  os << R"({"_class_name": "Transformer2DModel", "in_channels": )" << s.in_channels
     << R"(, "num_attention_heads": )" << s.heads << R"(, "attention_head_dim": )" << s.head_dim
     << R"(, "num_layers": 1, "cross_attention_dim": )" << s.cross_attention_dim
     << R"(, "norm_num_groups": )" << s.norm_num_groups << "}";
  return os.str();
}

// A model directory: config.json + model.safetensors (keys under `prefix.` when given, plus an
// unrelated key, as in a full-UNet file).
void write_model_dir(const std::string& dir, const ModelSpec& s = {}, const std::string& prefix = "") {
  fs::create_directories(dir);
  write_bytes(dir + "/config.json", config_json(s));
  attention::Transformer2DConfig c;
  c.in_channels = s.in_channels, c.num_attention_heads = s.heads, c.attention_head_dim = s.head_dim;
  c.num_layers = 1, c.cross_attention_dim = s.cross_attention_dim, c.norm_num_groups = s.norm_num_groups;
  Generator gen(s.seed);
  attention::Transformer2DModel model(c, gen);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& [k, t] : model.state_dict()) tensors.emplace_back(prefix.empty() ? k : prefix + "." + k, t);
  if (!prefix.empty()) tensors.emplace_back("conv_in.weight", Tensor::zeros({3, 3}));
  io::write_safetensors(dir + "/model.safetensors", tensors);
}

enum class Target { Random, Missing, Overflow };

// A data file of 6 samples: hidden_states (6,C,4,4), encoder_hidden_states (6,5,Cc), target.
void write_data(const std::string& path, const ModelSpec& s = {}, Target target = Target::Random,
                uint64_t seed = 7) {
  Generator gen(seed);
  const Shape hs{6, s.in_channels, 4, 4};
  std::vector<std::pair<std::string, Tensor>> t{{"hidden_states", Tensor::randn(hs, gen)},
                                                {"encoder_hidden_states", Tensor::randn({6, 5, s.cross_attention_dim}, gen)}};
  if (target == Target::Random) t.emplace_back("target", Tensor::randn(hs, gen));
  // Finite in the file, but (y − 1e30)² overflows the f32 loss.
  if (target == Target::Overflow) t.emplace_back("target", Tensor::full(hs, 1e30));
  io::write_safetensors(path, t);
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = (fs::temp_directory_path() /
            ("loom_cli_" + std::to_string(::getpid()) + "_" + info->test_suite_name() + "_" + info->name()))
               .string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (HasFailure())
      std::cerr << "(files of the failed test kept in " << dir_ << ")\n";
    else
      fs::remove_all(dir_);
  }

  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  Result loom(const std::vector<std::string>& args, const std::vector<std::string>& env = {}) const {
    return run_loom(args, dir_, env);
  }

  // The standard model directory "model" and data file "data.safetensors".
  void standard_fixtures() {
    write_model_dir(path("model"));
    write_data(path("data.safetensors"));
  }

  // `loom train` on the standard fixtures into `out` with a few steps; extra flags appended.
  Result train(const std::string& out, std::vector<std::string> extra = {}, const std::string& model = "model",
               const std::string& data = "data.safetensors") const {
    std::vector<std::string> args{"train", "--model", path(model), "--data", path(data), "--out", path(out),
                                  "--steps", "6", "--batch-size", "2", "--quiet"};
    args.insert(args.end(), extra.begin(), extra.end());
    return loom(args);
  }

  // `loom run` on the standard fixtures; returns the output tensor (undefined on failure).
  Tensor run(const std::string& output, std::vector<std::string> extra = {}, const std::string& model = "model",
             const std::string& input = "data.safetensors") const {
    std::vector<std::string> args{"run", "--model", path(model), "--input", path(input), "--output", path(output)};
    args.insert(args.end(), extra.begin(), extra.end());
    const Result r = loom(args);
    EXPECT_EQ(r.code, 0) << r;
    if (r.code != 0) return Tensor();
    EXPECT_THAT(r.out, HasSubstr("wrote " + path(output)));
    return read_output(path(output));
  }

  std::string dir_;
};


}  // namespace
}  // namespace loom
