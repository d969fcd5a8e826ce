// Inference with adapters: what `loom run` does. Loads a model directory, attaches
// any number of adapter files (LoRA of any key family, each with a weight; or a
// Custom Diffusion file), optionally fuses, and runs every sample of a data file.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "attention/sdpa.h"
#include "adapters/lora.h"
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

// Adapter files attached to a model: the LoRA set (null when no LoRA file was given; it must
// outlive the model's use) and one load report per file, in order.
struct AttachedAdapters {
  std::unique_ptr<adapters::LoraSet> lora;
  std::vector<io::AdapterLoadReport> reports;
};

// Loads every adapter onto `model` (any Module: a Transformer2DModel, a UNet): a Custom Diffusion
// file installs its processors (a weight on it is an OptionError); LoRA files of any key family
// join one LoraSet, each at its weight. Throws io::FileError for bad or non-matching files.
AttachedAdapters attach_adapters(const std::shared_ptr<nn::Module>& model, const std::vector<AdapterSpec>& specs,
                                 const io::AdapterLoadOptions& options);

struct RunOptions {
  std::string model_dir;  // a model directory, or a single-file UNet checkpoint with `config`
  std::string config;     // a UNet's --config: the diffusers config.json of a single-file checkpoint
  std::string prefix;  // block of a full-UNet weight file (model and adapters)
  std::vector<AdapterSpec> adapters;
  std::optional<attention::BackendKind> backend;
  bool fuse = false;
  int64_t batch_size = 8;  // samples per forward
  bool strict = true;
  std::string device = "cpu";  // cpu | cuda | cuda:N | auto
  std::string precision;       // empty: the device's default (SPEC §7)
  // On CUDA: the forward of a full batch is captured once as a CUDA graph and replayed for the
  // other full batches (the same numbers; --no-cuda-graph turns it off).
  bool cuda_graph = true;
};

struct RunResult {
  Tensor output;  // (N, C, H, W)
  std::vector<io::AdapterLoadReport> reports;
  std::vector<std::string> model_notes;  // what the model's load could not check (e.g. no checksums)
  int64_t graph_replays = 0;  // batches computed by replaying the captured forward
  std::string graph_note;     // a capture that failed (the run went on eagerly), or empty
};

// Throws io::FileError for bad inputs, NumericalError when an output is not finite.
RunResult run_model(const RunOptions& options, const DataSet& inputs);

// An input file's tensors by name (loom run of a UNet, loom sample): each tensor named in `slots`
// is stored there as f32; returns the names of the others, in file order.
std::vector<std::string> take_named_tensors(const io::TensorFile& file,
                                            const std::vector<std::pair<const char*, Tensor*>>& slots);
// "<input_name>: not used by <command>: a, b" for `unused` keys, appended to `notes` (no key is
// dropped without a word); nothing when there are none.
void note_unused_keys(const std::vector<std::string>& unused, const std::string& input_name,
                      const std::string& command, std::vector<std::string>& notes);

}  // namespace loom::trainer
