// `loom extract` and `loom resize`: flags, model loading, the report (see cli_extract.h).
#include "examples/cli_extract.h"

#include <sys/stat.h>

#include <cmath>
#include <iostream>

#include "io/lora_extract.h"
#include "trainer/trainer.h"
#include "unet/unet_io.h"

namespace loom::cli {

namespace {

using trainer::OptionError;

bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {}, sb {};
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

io::KeyFamily family_of(const std::string& name) {
  try {
    return io::parse_family(name);
  } catch (const Error& e) {
    throw OptionError(std::string("--format: ") + e.what());
  }
}

// A model directory loom loads: a UNet2DConditionModel directory, or a Transformer2DModel one.
std::shared_ptr<nn::Module> load_any_model(const std::string& dir, const std::string& flag) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) throw io::FileError(dir, "missing (" + flag + " names a model directory)");
  if (!S_ISDIR(st.st_mode)) throw io::FileError(dir, "is not a directory (" + flag + " names a model directory: config.json + weights)");
  if (::stat((dir + "/config.json").c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    throw io::FileError(dir + "/config.json", "is a directory, not a config file");
  std::shared_ptr<nn::Module> model;
  std::vector<std::string> notes;  // what the load could not check (no checksums), ignored config keys
  if (unet::is_unet_dir(dir)) {
    unet::LoadedUNet u = unet::load_unet_dir(dir);
    model = u.model, notes = u.notes;
  } else {
    model = io::load_model_dir(dir, "", DType::F32, &notes);
  }
  for (const std::string& n : notes) std::cerr << "loom: " << flag << " " << dir << ": " << n << "\n";
  return model;
}

}  // namespace

CLI::App* add_extract(CLI::App& app, ExtractArgs& a) {
  auto* e = app.add_subcommand("extract", "A LoRA approximating (tuned - base) by a rank-R SVD per module (kohya's extract)");
  e->add_option("--base", a.base, "Base model directory")->required();
  e->add_option("--tuned", a.tuned, "Fine-tuned model directory (same architecture)")->required();
  e->add_option("--rank", a.rank, "LoRA rank of Linear and 1x1 modules")->required();
  e->add_option("--conv-rank", a.conv_rank, "Rank of kxk Conv2d modules (LoCon); without it they are skipped");
  e->add_option("--alpha", a.alpha, "alpha of every module (default: its rank, scale 1)");
  e->add_option("--min-diff", a.min_diff, "Skip modules whose max |dW| is at most this (default 0: unchanged ones)");
  e->add_option("--clamp-quantile", a.clamp_quantile,
                "Clamp up and down at +- this quantile of their values, as kohya does (0.99); default: no clamping");
  e->add_option("--prefix", a.prefix, "Block path prepended to module names, e.g. down_blocks.1.attentions.0");
  e->add_option("--out", a.out, "Output LoRA file (.safetensors; .h5 with --format loom)")->required();
  e->add_option("--format", a.format, "kohya | peft | diffusers | loom")->capture_default_str();
  return e;
}

int run_extract(const ExtractArgs& a, const CLI::App& cmd) {
  io::ExtractOptions o;
  if (a.rank <= 0) throw OptionError("--rank must be a positive integer, got " + std::to_string(a.rank));
  o.rank = a.rank;
  if (cmd.count("--conv-rank")) {
    if (a.conv_rank <= 0) throw OptionError("--conv-rank must be a positive integer, got " + std::to_string(a.conv_rank));
    o.conv_rank = a.conv_rank;
  }
  if (cmd.count("--alpha")) {
    if (!(std::isfinite(a.alpha) && a.alpha > 0)) throw OptionError("--alpha must be a positive number, got " + std::to_string(a.alpha));
    o.alpha = a.alpha;
  }
  if (!(std::isfinite(a.min_diff) && a.min_diff >= 0))
    throw OptionError("--min-diff must be a number >= 0, got " + std::to_string(a.min_diff));
  o.min_diff = a.min_diff;
  if (cmd.count("--clamp-quantile")) {
    if (!(a.clamp_quantile > 0 && a.clamp_quantile <= 1))
      throw OptionError("--clamp-quantile must be in (0, 1], got " + std::to_string(a.clamp_quantile));
    o.clamp_quantile = a.clamp_quantile;
  }
  o.prefix = a.prefix;
  const io::KeyFamily family = family_of(a.format);
  for (const std::string* dir : {&a.base, &a.tuned})
    if (same_file(a.out, *dir) || same_file(a.out, *dir + "/config.json"))
      throw OptionError("--out " + a.out + " is a file of the model " + *dir + ": it would be replaced");
  const auto base = load_any_model(a.base, "--base");
  const auto tuned = load_any_model(a.tuned, "--tuned");
  const io::ExtractResult r = io::extract_lora(*base, *tuned, o, a.base, a.tuned);
  io::write_extracted_lora(r, a.out, family);
  std::cout << r.report.table() << "wrote " << a.out << " (" << a.format << "): " << r.report.written()
            << " modules\n";
  return 0;
}

CLI::App* add_resize(CLI::App& app, ResizeArgs& a) {
  auto* r = app.add_subcommand("resize", "Reduce the rank of a LoRA (fixed rank, or the smallest keeping an energy share)");
  r->add_option("in", a.in, "Input LoRA file (any family loom reads)")->required();
  r->add_option("out", a.out, "Output file")->required();
  r->add_option("--rank", a.rank, "New rank (a module already at or below it keeps its rank)");
  r->add_option("--energy", a.energy, "Smallest rank per module keeping this share of sum(sigma^2), in (0, 1]");
  r->add_option("--format", a.format, "kohya | peft | diffusers | loom (default: the input's family)");
  return r;
}

int run_resize(const ResizeArgs& a, const CLI::App& cmd) {
  io::ResizeOptions o;
  if (!cmd.count("--rank") && !cmd.count("--energy")) throw OptionError("resize: give --rank R or --energy E (or both)");
  if (cmd.count("--rank")) {
    if (a.rank <= 0) throw OptionError("--rank must be a positive integer, got " + std::to_string(a.rank));
    o.rank = a.rank;
  }
  if (cmd.count("--energy")) {
    if (!(a.energy > 0 && a.energy <= 1)) throw OptionError("--energy must be in (0, 1], got " + std::to_string(a.energy));
    o.energy = a.energy;
  }
  std::optional<io::KeyFamily> family;
  if (cmd.count("--format")) family = family_of(a.format);
  if (same_file(a.in, a.out)) throw OptionError("the output " + a.out + " is the input file " + a.in + ": it would be replaced");
  const io::LowRankReport r = io::resize_lora_file(a.in, a.out, o, family);
  std::cout << r.table() << "wrote " << a.out << ": " << r.written() << " modules\n";
  return 0;
}

}  // namespace loom::cli
