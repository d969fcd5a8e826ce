// `loom sample` (SPEC §8): the subcommand's flags and its run, kept out of loom.cpp.
#pragma once

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "trainer/sample.h"

namespace loom::cli {

struct SampleArgs {
  std::string model, config, input, output, scheduler = "ddim", scheduler_config;
  std::vector<std::string> adapters;
  int64_t steps = 30;
  double guidance_scale = 7.5;
  uint64_t seed = 0;
  int64_t height = 0, width = 0;
  bool quiet = false;
  bool no_cuda_graph = false;
  bool no_fuse = false, deterministic = false;
  std::string device, precision;
};

// Registers `sample` on `app`; returns the subcommand (for count() of the optional flags).
CLI::App* add_sample(CLI::App& app, SampleArgs& args);

// Runs it. Exit codes through exceptions, as loom.cpp's main maps them: trainer::OptionError
// (usage, 2), io::FileError (bad input file, 3), trainer::NumericalError (4). Returns 0.
int run_sample(const SampleArgs& args, const CLI::App& cmd);

}  // namespace loom::cli
