// What the two built-in tasks (trainer/builtin_task.h: one spatial-transformer block;
// trainer/builtin_unet.h: a whole UNet) share: the hidden change a teacher carries, the share of
// it that the trained adapter recovered, the training recipe and the printed report.
// Internal to loom_trainer.
#pragma once

#include <iosfwd>
#include <map>
#include <string>
#include <vector>

#include "nn/module.h"
#include "trainer/builtin_task.h"
#include "trainer/trainer.h"

namespace loom::trainer::builtin {

constexpr int64_t kHiddenRank = 4;    // rank of the LoRA task's hidden ΔW (and the default --rank)
constexpr double kChangeScale = 0.5;  // ‖ΔW‖ / ‖W‖

// Σ t² in f64.
double squared_norm(const Tensor& t);

// Adds to each `<path>.weight` [out, in] of `teacher` a hidden change: rank kHiddenRank (LoRA
// task) or full rank (Custom Diffusion task), scaled to kChangeScale of the weight's norm.
// Returns path -> ΔW.
std::map<std::string, Tensor> add_hidden_changes(nn::Module& teacher, const std::vector<std::string>& paths,
                                                 bool low_rank, Generator& gen);

// 1 − ‖learned − hidden‖² / ‖hidden‖² over the adapted weights: ΔW = s·B·A of the trained LoRA
// (r.lora), or the Custom Diffusion weight minus the base weight; modules the teacher left alone
// count with a hidden change of zero.
double recovered_share(const nn::Module& base, const TrainResult& r, std::map<std::string, Tensor> deltas);

// The report's files (model_dir = out_dir/base_model, data_path = out_dir/data.safetensors);
// Error for an --adapter other than lora / custom_diffusion.
BuiltinReport start_report(const BuiltinOptions& opt);

// The recipe both tasks train with: full batches of `samples`, rank (default kHiddenRank) with
// alpha = rank, Adam with a cosine schedule after 10 warm-up steps, lr 2e-2 (LoRA) / 5e-3
// (Custom Diffusion), unless the options say otherwise. Targets and steps are the caller's.
TrainOptions train_options(const BuiltinOptions& opt, int64_t samples);

// The loss target and reload tolerance of a run: tighter in f32 than in bf16 / f16, whose output
// rounding sets a floor.
struct Thresholds {
  double loss_fraction, reload_tolerance;
};
Thresholds thresholds(const Placement& where, double f32_loss_fraction);

// Sets report.passed and prints the summary (losses, recovery, reload check, time, files).
void finish_report(BuiltinReport& report, const TrainResult& r, const Placement& where, const Thresholds& th,
                   const std::string& dir, std::ostream& out);

}  // namespace loom::trainer::builtin
