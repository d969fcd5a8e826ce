// The trainer: fits a LoRA or Custom Diffusion adapter of a Transformer2DModel
// to a data file (SPEC §5: hidden_states, encoder_hidden_states, optional
// encoder_attention_mask, target), with seeded shuffling, gradient
// accumulation, an LR schedule, grad-norm clipping, checkpoints and exact
// resumes. Used by the `loom` command line and the examples.
//
// Output directory: adapter.safetensors (PEFT/diffusers keys; Custom Diffusion
// keys for that adapter), checkpoint.h5, loss.csv, loss.png. Nothing is
// written for a step whose loss or gradients are not finite: training stops
// with NumericalError naming the step, and the last good files stay as they were.
// Except in f16 (dynamic loss scaling, optim/grad_scaler.h): a step whose scaled
// gradients overflow is skipped and logged with the new scale, and training goes on.
#pragma once

#include <functional>
#include <iosfwd>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "adapters/lora.h"
#include "attention/transformer.h"
#include "tensor/precision.h"
#include "trainer/diffusion_options.h"

namespace loom::trainer {

// A non-finite loss, gradient or output (the command line's exit code 4).
class NumericalError : public Error {
 public:
  explicit NumericalError(const std::string& msg) : Error(msg) {}
};

// An option that does not fit the run (the command line's exit code 2): a rank larger than a
// target module allows, a resume asked to go backwards, an output directory in use.
class OptionError : public Error {
 public:
  explicit OptionError(const std::string& msg) : Error(msg) {}
};

// A data file held in memory; every tensor in the model's dtype.
struct DataSet {
  Tensor hidden_states;           // (N, C, H, W)
  Tensor encoder_hidden_states;   // (N, K, Cc), or undefined
  Tensor encoder_attention_mask;  // (N, K) keep-mask, or undefined
  Tensor target;                  // (N, C, H, W), or undefined when not training
  int64_t size() const { return hidden_states.size(0); }
  // Reads a safetensors or HDF5 data file; errors (FileError) name the file and the key.
  static DataSet load(const std::string& path, bool need_target, DType dtype = DType::F32);
  // Throws io::FileError naming `path` and the tensor when the data does not fit the model.
  void check_fits(const attention::Transformer2DConfig& config, const std::string& path) const;
  // The rows `indices` of every tensor.
  DataSet rows(const std::vector<int64_t>& indices) const;
};

struct TrainOptions {
  std::string adapter = "lora";  // lora | custom_diffusion
  int64_t rank = 4;
  std::optional<double> alpha;   // LoRA network_alpha (none: scale 1)
  std::vector<std::string> targets = {"to_q", "to_k", "to_v", "to_out.0"};
  bool train_q_out = false;      // Custom Diffusion: "crossattn" instead of "crossattn_kv"
  std::string optimizer = "adamw";
  double lr = 1e-3;
  std::optional<double> weight_decay;
  int64_t steps = 100;
  // Length of the LR schedule (0: steps). A resume that extends a run keeps the planned length
  // here: linear and cosine schedules then hold their final LR after it (see train()).
  int64_t schedule_steps = 0;
  int64_t batch_size = 1;
  int64_t grad_accum = 1;
  uint64_t seed = 0;
  std::string scheduler = "constant";
  int64_t warmup_steps = 0;
  double max_grad_norm = 0.0;    // 0: no clipping
  int64_t checkpoint_every = 0;  // 0: only at the end
  std::string init_adapter;      // start from this adapter file
  std::string prefix;            // block prefix written into adapter keys
  std::string out_dir = "loom-out";
  bool quiet = false;
  std::string device = "cpu";    // cpu | cuda | cuda:N | auto (SPEC §7)
  std::string precision;         // f32 | tf32 | bf16 | f16; empty: the device's default
  DiffusionOptions diffusion;    // the UNet's diffusion objective (enabled: a UNet run; SPEC §8)
  std::string save_dtype = "f32";  // f32 | bf16 | f16: dtype of the adapter tensors in adapter.safetensors (LoRA)
  // On CUDA, capture a step's forward and backward once as a CUDA graph and replay it (see
  // train_with). Not saved in checkpoints: like the device, a choice of each run (--no-cuda-graph).
  bool cuda_graph = true;

  std::string to_json() const;
  static TrainOptions from_json(const std::string& text);
  void validate() const;  // throws naming the bad option
};

struct TrainResult {
  std::vector<double> losses;  // one per optimizer step, from step 1
  // Keeps a trained LoRA attached to the model after train() returns (Custom Diffusion
  // lives in the model's processors and needs no handle).
  std::shared_ptr<adapters::LoraSet> lora;
  int64_t steps = 0;
  std::string adapter_path, checkpoint_path;
  double seconds = 0.0;
  size_t peak_device_bytes = 0;  // the caching allocator's peak during training (CUDA; 0 on the CPU)
  int64_t graph_replays = 0;     // micro-batches computed by replaying the captured CUDA graph
};

// The device and precision a run with these options uses (parses and checks both; the
// errors name --device / --precision).
struct Placement {
  Device device;
  Precision precision;
  std::string describe() const;  // "device cuda:0, precision bf16 (…)"
};
Placement placement_of(const std::string& device, const std::string& precision);
// Moves `model` to the placement: its weights to the device, in the precision's storage dtype.
void place_model(nn::Module& model, const Placement& where);

// Trains on `model` (its base weights are frozen and never modified). `resume_dir`,
// when given, holds the checkpoint.h5 to continue from: its saved options are used, except
// out_dir and quiet (from `options`) and steps: options.steps == 0 continues to the run's
// planned length; a smaller total stops early on the planned schedule; a larger one extends
// the run (constant schedules continue as if planned that long; linear and cosine keep their
// planned length and hold their final LR; the log says which). Takes the output directory's
// lock (OutputDirLock). Throws OptionError for a rank above min(in, out) of a target module
// or a total at or below the checkpoint's step; NumericalError naming the step when the loss,
// the gradients or the updated adapter weights are not finite. Progress goes to `log`.
TrainResult train(const std::shared_ptr<attention::Transformer2DModel>& model, const DataSet& data,
                  const TrainOptions& options, std::ostream& log, const std::string& resume_dir = "");

// The training loop of any model, given its objective (train() above and train_unet() in
// trainer/diffusion_objective.h are its two users). The objective gives the loss of one
// micro-batch: the samples `indices` (rows of the data) of micro-batch number `micro`
// (step · grad_accum + a, counted from the run's start, so that what it draws from the seed
// repeats exactly on a resume); the loss is a scalar in f32 (or wider), not yet divided by
// grad_accum. It comes in two parts, so that the device part can be captured as a CUDA graph:
//  - stage(indices, micro): the host-dependent part (which rows, random draws, host lookups).
//    Returns the micro-batch's input tensors (undefined where absent), on the CPU or already on
//    the run's device; the trainer copies the CPU ones to the device (on CUDA from pinned
//    memory, asynchronously).
//  - loss(inputs): the loss from those inputs, all on the run's device, by device work only: no
//    host read of a device value, no synchronous copy, no host value that changes between steps.
// MakeBatchLoss builds the objective once the run's options (a resume's saved ones) and
// placement are known, after the model is placed and the adapter attached.
using StageBatch = std::function<std::vector<Tensor>(const std::vector<int64_t>& indices, int64_t micro)>;
using StagedLoss = std::function<Variable(const std::vector<Tensor>& inputs)>;
struct BatchObjective {
  StageBatch stage;
  StagedLoss loss;
};
using MakeBatchLoss = std::function<BatchObjective(const TrainOptions& run, const Placement& where)>;

// CUDA graphs (options.cuda_graph, on CUDA): after kGraphWarmupSteps eager steps the loss and
// the backward of one micro-batch are captured once (tensor/graph.h) and then replayed for every
// micro-batch, with the inputs copied into the same device buffers first; everything whose
// arguments change per step (staging and random draws, gradient accumulation, the f16 loss
// scale, clipping, the LR schedule, the optimizer update) runs eagerly around the replay, on the
// gradients the graph wrote. The numbers are those of the eager run. Runs that cannot be
// captured stay eager and say why once on `log`: active dropout (its seeds are drawn on the
// host), f16 loss scaling, Custom Diffusion, or a capture that fails (a warning naming the CUDA
// error; training goes on eagerly).
constexpr int64_t kGraphWarmupSteps = 2;

TrainResult train_with(const std::shared_ptr<nn::Module>& model, int64_t samples, const MakeBatchLoss& objective,
                       const TrainOptions& options, std::ostream& log, const std::string& resume_dir = "");

// mkdir -p; throws io::FileError naming the directory.
void make_dirs(const std::string& dir);

// Writes loss.csv (step,loss) and loss.png into `dir`, atomically.
void write_loss_files(const std::string& dir, const std::vector<double>& losses);

}  // namespace loom::trainer
