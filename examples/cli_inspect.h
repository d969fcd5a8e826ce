// `loom inspect` and `loom gradcheck`: their runs, kept out of loom.cpp.
#pragma once

#include <string>

namespace loom::cli {

// Prints a weight file: format, attributes, metadata, tensors, key family, ranks and alphas (and a
// training checkpoint's step, options and losses). io::FileError for a bad file (exit 3). Returns 0.
int run_inspect(const std::string& path);

// Runs the f64 gradient checks of the ops (autograd/op_cases) and of the attention layers (plain,
// cross with a mask, added K/V, LoRA, Custom Diffusion) whose names contain `filter` (all when
// empty) and prints one row each. UsageError when the filter selects nothing. Returns 0 when all
// pass, 4 when one fails.
int run_gradcheck(const std::string& filter);

}  // namespace loom::cli
