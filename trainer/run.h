// Inference with adapters: what `loom run` does. Loads a model directory, attaches
// any number of adapter files (LoRA of any key family, each with a weight; or a
// Custom Diffusion file), optionally fuses, and runs every sample of a data file.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "attention/sdpa.h"
#include "io/adapter_io.h"
#include "trainer/trainer.h"

namespace loom::trainer {

struct AdapterSpec {
  std::string path;
  double weight = 1.0;
  bool weight_given = false;
  // "FILE" or "FILE:WEIGHT": a text naming an existing file is a FILE; otherwise what follows
  // the last ':' must be a finite number. Throws naming the text and the weight.
  static AdapterSpec parse(const std::string& text);
};

struct RunOptions {
  std::string model_dir;
  std::string prefix;  // block of a full-UNet weight file (model and adapters)
  std::vector<AdapterSpec> adapters;
  std::optional<attention::BackendKind> backend;
  bool fuse = false;
  int64_t batch_size = 8;  // samples per forward
  bool strict = true;
  std::string device = "cpu";  // cpu | cuda | cuda:N | auto
  std::string precision;       // empty: the device's default (SPEC §7)
};

struct RunResult {
  Tensor output;  // (N, C, H, W)
  std::vector<io::AdapterLoadReport> reports;
  std::vector<std::string> model_notes;  // what the model's load could not check (e.g. no checksums)
};

// Throws io::FileError for bad inputs, NumericalError when an output is not finite.
RunResult run_model(const RunOptions& options, const DataSet& inputs);

}  // namespace loom::trainer
