// Normalisation and dropout layers.
//
//   LayerNorm(dim):          x [..., dim] normalised over the last dim.
//   GroupNorm(groups, C):    x [N, C, *] normalised per (sample, group of C/groups
//                            channels) over those channels and all spatial positions.
//   Dropout(p):              zeroes elements with probability p and scales the rest
//                            by 1/(1−p) while training; the identity in eval mode.
//
// Affine parameters `weight` (init 1) and `bias` (init 0), shape [dim] / [C].
// Normalisation uses the biased variance, as PyTorch does.
#pragma once

#include "nn/module.h"
#include "tensor/random.h"

namespace loom::nn {

class LayerNorm : public UnaryModule {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5, bool elementwise_affine = true, DType dtype = DType::F32,
                     Device device = Device::cpu());
  std::string type_name() const override { return "LayerNorm"; }
  Variable forward(const Variable& x) const override;  // [..., dim] -> [..., dim]
  // {s, forward(s)} with s = x + residual (one shape), from one pass (autograd add_layer_norm): a
  // transformer block's residual add and the norm after it.
  std::pair<Variable, Variable> forward_after_add(const Variable& x, const Variable& residual) const;

  int64_t dim() const { return dim_; }
  double eps() const { return eps_; }
  const Variable& weight() const { return weight_; }  // undefined without elementwise_affine
  const Variable& bias() const { return bias_; }

 private:
  int64_t dim_;
  double eps_;
  Variable weight_, bias_;
};

class GroupNorm : public UnaryModule {
 public:
  // channels % groups must be 0.
  GroupNorm(int64_t groups, int64_t channels, double eps = 1e-5, bool affine = true, DType dtype = DType::F32,
            Device device = Device::cpu());
  std::string type_name() const override { return "GroupNorm"; }
  Variable forward(const Variable& x) const override;  // [N, C, *] -> [N, C, *]
  // silu(forward(x + shift)), one fused pass where no gradient is recorded (autograd
  // group_norm_silu); shift [N, C] (broadcast over the spatial dims) or undefined.
  Variable forward_silu(const Variable& x, const Variable& shift = Variable()) const;

  int64_t groups() const { return groups_; }
  int64_t channels() const { return channels_; }
  double eps() const { return eps_; }
  const Variable& weight() const { return weight_; }  // undefined without affine
  const Variable& bias() const { return bias_; }

 private:
  // x must be [N, channels, *] (named in the error).
  void check_input(const Variable& x) const;
  int64_t groups_, channels_;
  double eps_;
  Variable weight_, bias_;
};

// Uses the module's training flag (train()/eval()) and draws its masks from a
// Generator: loom::default_generator() unless set_generator() names another
// (which must outlive the module).
class Dropout : public UnaryModule {
 public:
  explicit Dropout(double p = 0.5);
  std::string type_name() const override { return "Dropout"; }
  Variable forward(const Variable& x) const override;  // same shape

  double p() const { return p_; }
  void set_generator(Generator& gen) { gen_ = &gen; }
  Generator& generator() const { return *gen_; }

 private:
  double p_;
  Generator* gen_;
};

// Points every Dropout in `root`'s subtree (root included) at `gen`.
void set_dropout_generator(Module& root, Generator& gen);

}  // namespace loom::nn
