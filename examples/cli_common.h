// What the `loom` subcommands' files share (examples/loom.cpp and examples/cli_*.cpp).
#pragma once

#include <string>

#include "tensor/determinism.h"
#include "tensor/error.h"
#include "trainer/trainer.h"

namespace loom::cli {

// A command-line mistake found after parsing: loom.cpp's main prints it with "(see loom --help)"
// and exits with code 2.
struct UsageError : Error {
  using Error::Error;
};

// Applies --deterministic (tensor/determinism.h: process-wide) and returns the run's first stderr
// line, "loom: <device and precision>[, deterministic kernels]".
inline std::string placement_line(const trainer::Placement& p, bool deterministic) {
  set_deterministic_algorithms(deterministic);
  return "loom: " + p.describe() + (deterministic ? ", deterministic kernels" : "");
}

}  // namespace loom::cli
