// Adam and AdamW with bias correction: PyTorch's torch.optim.Adam / AdamW
// (amsgrad off). For each parameter p with gradient g, per step, t counting
// this parameter's own updates from 1:
//
//   Adam:   g ← g + weight_decay·p                  (L2 penalty in the gradient)
//   AdamW:  p ← p·(1 − lr·weight_decay)             (decoupled, before the step)
//   m ← β1·m + (1 − β1)·g
//   v ← β2·v + (1 − β2)·g²
//   m̂ = m / (1 − β1ᵗ),  v̂ = v / (1 − β2ᵗ)
//   p ← p − lr · m̂ / (√v̂ + eps)
//
// (Computed as PyTorch does: p − (lr/(1 − β1ᵗ))·m / (√v/√(1 − β2ᵗ) + eps).)
//
// State per parameter: "<param>.exp_avg" (m), "<param>.exp_avg_sq" (v) and
// "<param>.step" (t, a 0-d f64 CPU tensor); all three are present or none.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "optim/optimizer.h"

namespace loom::optim {

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

// As AdamOptions; the default weight decay is PyTorch's AdamW default.
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

class Adam : public Optimizer {
 public:
  // Throws for negative lr / eps / weight_decay or betas outside [0, 1).
  Adam(NamedParameters params, const AdamOptions& options = {});

  std::string name() const override { return decoupled_ ? "adamw" : "adam"; }
  void step() override;
  std::map<std::string, Tensor> state_dict() const override;
  void load_state_dict(const std::map<std::string, Tensor>& dict) override;

  // The options, with lr() as the current learning rate.
  AdamOptions options() const;
  // Updates taken by parameter `name` (0 before its first; throws for an unknown name).
  int64_t step_count(const std::string& name) const;

 protected:
  // decoupled: AdamW's weight decay instead of Adam's L2 term.
  Adam(NamedParameters params, const AdamOptions& options, bool decoupled);

 private:
  struct State {
    Tensor exp_avg, exp_avg_sq;  // undefined until the first update
    int64_t step = 0;
  };
  AdamOptions options_;
  bool decoupled_;
  std::vector<State> state_;
};

class AdamW : public Adam {
 public:
  AdamW(NamedParameters params, const AdamWOptions& options = {});

  AdamWOptions options() const;
};

}  // namespace loom::optim
