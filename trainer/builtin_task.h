// The built-in task (SPEC §6): `loom train` with no arguments. A seeded spatial
// transformer is the base; a teacher is the base plus a hidden change (a rank-r
// ΔW on the attention projections for LoRA; new k/v weights in attn2 for Custom
// Diffusion); inputs are random. The adapter is trained to match the teacher,
// and the run reports the start and final loss, how much of the hidden change was
// recovered, and whether the saved adapter, loaded again through run_model,
// reproduces the trained outputs. Everything it needs it writes into out_dir:
// base_model/ (config.json + model.safetensors), data.safetensors, the adapter,
// the checkpoint and the loss files.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <optional>
#include <string>

namespace loom::trainer {

struct BuiltinOptions {
  std::string adapter = "lora";  // lora | custom_diffusion
  std::string out_dir = "loom-builtin";
  uint64_t seed = 0;
  int64_t steps = 0;  // 0: the task's own default
  std::optional<int64_t> rank;        // LoRA rank (default: the hidden change's rank, 4)
  std::optional<double> lr;           // default: 2e-2 (LoRA), 5e-3 (Custom Diffusion)
  std::optional<std::string> optimizer;  // default: adam
  bool quiet = false;
  std::string device = "cpu";  // cpu | cuda | cuda:N | auto
  std::string precision;       // empty: the device's default
  bool cuda_graph = true;      // TrainOptions::cuda_graph (--no-cuda-graph turns it off)
};

struct BuiltinReport {
  double start_loss = 0, final_loss = 0;
  double recovered = 0;      // 1 − ‖learned change − hidden change‖² / ‖hidden change‖²
  double reload_error = 0;   // relative error of the reloaded adapter's outputs
  bool passed = false;       // final ≤ 1% of start (10% in bf16 / f16, whose output rounding sets a floor),
                             // and the reload reproduces the outputs (≤ 1e-5; 1e-2 in bf16 / f16)
  std::string adapter_path, model_dir, data_path;
};

// Prints the summary to `out`, progress to `log`.
BuiltinReport run_builtin_task(const BuiltinOptions& options, std::ostream& out, std::ostream& log);

}  // namespace loom::trainer
