// Stochastic gradient descent with momentum, dampening, Nesterov momentum and
// L2 weight decay: PyTorch's torch.optim.SGD. For each parameter p with
// gradient g, per step:
//
//   d = g + weight_decay·p
//   momentum ≠ 0:  buf = d                                   (first update)
//                  buf = momentum·buf + (1 − dampening)·d     (later updates)
//                  d   = nesterov ? d + momentum·buf : buf
//   p ← p − lr·d
//
// State (momentum ≠ 0 only): "<param>.momentum_buffer".
#pragma once

#include <map>
#include <string>
#include <vector>

#include "optim/optimizer.h"

namespace loom::optim {

struct SGDOptions {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

class SGD : public Optimizer {
 public:
  // Throws for negative lr / momentum / weight_decay, or nesterov without
  // momentum > 0 and dampening == 0 (PyTorch's rule).
  SGD(NamedParameters params, const SGDOptions& options = {});

  std::string name() const override { return "sgd"; }
  void step() override;
  std::map<std::string, Tensor> state_dict() const override;
  void load_state_dict(const std::map<std::string, Tensor>& dict) override;

  // The options, with lr() as the current learning rate.
  SGDOptions options() const;

 private:
  SGDOptions options_;
  std::vector<Tensor> momentum_buffer_;  // per parameter; undefined until its first update
};

}  // namespace loom::optim
