// `loom decode` and `loom encode` (SPEC §8): latents to PNG images and back through
// diffusers' AutoencoderKL (unet/vae.h). See docs/unet.md, "The VAE".
//
// Errors are thrown for main() to report: trainer::OptionError for usage (exit 2),
// io::FileError for a bad or missing input (exit 3), trainer::NumericalError for a
// non-finite decoded image or latent (exit 4).
#pragma once

#include <CLI/CLI.hpp>

#include <string>
#include <vector>

namespace loom::cli {

struct VaeArgs {
  std::string vae, variant;
  std::string device, precision;
  // decode
  std::string input, key = "latents", out_dir;
  // encode
  std::vector<std::string> images;
  std::string out_file;
  bool sample = false, center_crop = false;
  uint64_t seed = 0;
};

// Adds the `decode` and `encode` subcommands.
void add_vae_commands(CLI::App& app, VaeArgs& args);
// Runs whichever of them was given and returns the exit code; -1 when neither was.
int run_vae_command(const CLI::App& app, VaeArgs& args);

}  // namespace loom::cli
