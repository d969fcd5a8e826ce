// The loss and gradients of one optimizer step for train_with (trainer.h): its micro-batches
// run eagerly, or by replaying a CUDA graph captured once (see kGraphWarmupSteps in trainer.h).
// Either way the same kernels compute the same numbers; the graph saves the host's launch work.
#pragma once

#include <functional>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "optim/grad_scaler.h"
#include "tensor/graph.h"
#include "trainer/trainer.h"

namespace loom::trainer {

class StepComputer {
 public:
  // `params`: the trained parameters (their gradients are what a step leaves); `scaler`: the
  // f16 loss scaler or nullptr. Decides whether graphs can be used and, when not on the CPU,
  // says so in one line on `log` (unless options.quiet).
  StepComputer(const BatchObjective& objective, const Placement& where, const TrainOptions& options,
               std::vector<Variable> params, const nn::Module& model, const optim::GradScaler* scaler,
               std::ostream& log);
  ~StepComputer();
  StepComputer(const StepComputer&) = delete;
  StepComputer& operator=(const StepComputer&) = delete;

  // Computes the micro-batches of step `step` (0-based; micro-batch step·grad_accum + a takes the
  // samples batch_of(micro)). Leaves the step's gradients in the parameters (summed over the
  // micro-batches, each loss divided by grad_accum; scaled by the f16 loss scale) and returns the
  // step's loss (the sum of the divided micro-batch losses, a 0-d f32 tensor on the device).
  // `steps_done` counts the steps this process has run (graphs are captured after the warm-up).
  Tensor run(int64_t step, int64_t steps_done, const std::function<std::vector<int64_t>(int64_t)>& batch_of);

  bool graphs_on() const { return use_graph_; }
  int64_t replays() const { return replays_; }

 private:
  std::vector<Tensor> upload(const std::vector<Tensor>& staged, bool into_static);
  Tensor eager_micro(const std::vector<Tensor>& staged);
  bool capture(const std::vector<Tensor>& staged);
  Tensor replay_micro(const std::vector<Tensor>& staged, int64_t a, std::vector<Tensor>& accumulated);

  BatchObjective objective_;
  Placement where_;
  int64_t grad_accum_;
  std::vector<Variable> params_;
  const optim::GradScaler* scaler_;
  std::ostream& log_;
  bool use_graph_ = false;
  std::vector<std::unique_ptr<PinnedUpload>> uploads_;  // one per staged input
  std::vector<Tensor> static_inputs_;                   // the graph's inputs (refilled per micro-batch)
  std::vector<Tensor> captured_grads_;                  // the graph's outputs, one per parameter
  Tensor captured_loss_;
  std::unique_ptr<DeviceGraph> graph_;                  // declared last: destroyed first
  int64_t replays_ = 0;
};

}  // namespace loom::trainer
