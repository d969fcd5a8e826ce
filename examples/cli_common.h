// What the `loom` subcommands' files share (examples/loom.cpp and examples/cli_*.cpp).
#pragma once

#include "tensor/error.h"

namespace loom::cli {

// A command-line mistake found after parsing: loom.cpp's main prints it with "(see loom --help)"
// and exits with code 2.
struct UsageError : Error {
  using Error::Error;
};

}  // namespace loom::cli
