// `loom extract` and `loom resize` (SPEC §9; formulas in io/lora_extract.h, docs/io.md).
//
//   loom extract --base DIR --tuned DIR --rank R [--conv-rank R2] [--alpha A] [--min-diff D]
//                [--clamp-quantile Q] [--prefix P] --out FILE [--format kohya|peft|diffusers|loom]
//   loom resize IN OUT (--rank R | --energy E | both) [--format kohya|peft|diffusers|loom]
//
// Both print one line per module (rank, energy kept) and the total on stdout. Usage mistakes
// throw trainer::OptionError (exit 2), bad files io::FileError (exit 3).
#pragma once

#include <CLI/CLI.hpp>
#include <optional>
#include <string>

namespace loom::cli {

struct ExtractArgs {
  std::string base, tuned, out, format = "kohya", prefix;
  int64_t rank = 0, conv_rank = 0;
  double alpha = 0, min_diff = 0, clamp_quantile = 0;
};
CLI::App* add_extract(CLI::App& app, ExtractArgs& a);
int run_extract(const ExtractArgs& a, const CLI::App& cmd);

struct ResizeArgs {
  std::string in, out, format;
  int64_t rank = 0;
  double energy = 0;
};
CLI::App* add_resize(CLI::App& app, ResizeArgs& a);
int run_resize(const ResizeArgs& a, const CLI::App& cmd);

}  // namespace loom::cli
