// loom::optim::Optimizer: the common base of SGD, Adam and AdamW, and the
// factory make_optimizer() a trainer uses to pick one by name.
//
// Parameters are given by name (module.named_parameters(), usually filtered
// with trainable()), and every piece of optimizer state is kept per parameter
// name, so that state_dict() keys ("<param>.exp_avg", "<param>.step", ...) can
// be written to a file next to the model's own dotted names.
//
// Contracts shared by every optimizer:
//   * Construction rejects (loom::Error) an empty list, an empty or duplicate
//     name, an undefined Variable, a Variable given twice under two names, a
//     non-leaf, and parameters that do not require grad (all of those named).
//   * step() updates each parameter whose grad() is defined, in place: the new
//     values are copied into the parameter's existing tensor (same Variable,
//     same VariableImpl, same storage), so modules holding the handle see the
//     update. Parameters with an undefined grad are skipped: value and state
//     untouched (Adam's step counter not advanced). No graph is recorded.
//   * The update is one call of the device's fused optimizer slot
//     (ops::optimizer_update, tensor/ops_fused.h) for all parameters with a
//     gradient: one kernel launch on CUDA, no per-tensor op chains.
//   * State tensors have the parameter's shape, dtype and device; they are
//     created lazily on a parameter's first update and updated in place by
//     later steps; state_dict() hands out copies (snapshots).
//   * load_state_dict() is all-or-nothing: every entry is checked before any
//     state changes, and an error names the offending key.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "autograd/variable.h"
#include "tensor/fused_args.h"

namespace loom::nn {
class Module;
}

namespace loom::optim {

using NamedParameters = std::vector<std::pair<std::string, Variable>>;

// The entries of `params` that require grad, order kept.
NamedParameters trainable(const NamedParameters& params);
// module.named_parameters() filtered to the trainable ones.
NamedParameters trainable_parameters(const nn::Module& module);

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // "sgd", "adam" or "adamw".
  virtual std::string name() const = 0;
  // One update of every parameter that has a gradient (see the file comment).
  virtual void step() = 0;
  // Drops every parameter's gradient (Variable::zero_grad on each).
  void zero_grad();

  // The learning rate the next step() uses; set_lr() throws unless finite and >= 0.
  double lr() const { return lr_; }
  void set_lr(double lr);

  // Per-parameter state by "<param>.<field>"; only parameters updated at least
  // once (or loaded) have entries. Fields are listed by each optimizer.
  virtual std::map<std::string, Tensor> state_dict() const = 0;
  // Replaces the whole state with `dict` (parameters absent from it start
  // fresh). Throws naming the key for: a key that is not "<known param>.<known
  // field>", a parameter with some but not all of its fields (the missing key),
  // a tensor whose shape differs from the parameter's (both shapes named), or
  // a bad step counter. Tensors are converted to the parameter's dtype and
  // device and copied.
  virtual void load_state_dict(const std::map<std::string, Tensor>& dict) = 0;

  const NamedParameters& named_parameters() const { return params_; }
  std::vector<Variable> parameters() const;  // the Variables, in order (for clip_grad_norm)

 protected:
  // Validates `params` (see the file comment) and `lr`; `who` prefixes errors.
  Optimizer(NamedParameters params, double lr, const std::string& who);

  // Splits a state key "<param>.<field>" into its parameter's index and the
  // field; throws naming the key when either part is unknown.
  std::pair<size_t, std::string> parse_key(const std::string& key, const std::vector<std::string>& fields) const;
  // `t` as a state tensor for parameter `i`: shape checked (error names `key`),
  // converted to the parameter's dtype/device, copied.
  Tensor adopt_state(const std::string& key, const Tensor& t, size_t i) const;

  const std::string& who() const { return who_; }

  // Writes `value` into the parameter's existing tensor (same Variable, same
  // storage); `value` has the parameter's shape.
  static void assign(const Variable& param, const Tensor& value);
  // Runs the fused update `args`, whose entry k belongs to owners[k] (param =
  // owners[k]'s tensor, grad its gradient): gradients are made contiguous, and a
  // non-contiguous parameter is updated through a contiguous copy written back.
  static void run_update(OptimizerUpdateArgs args, const std::vector<Variable>& owners);

 private:
  NamedParameters params_;
  double lr_;
  std::string who_;
};

// Settings for make_optimizer(); each optimizer reads the fields it knows.
struct OptimizerConfig {
  double lr = 1e-3;
  // Unset: the optimizer's own default (0 for sgd and adam, 1e-2 for adamw).
  std::optional<double> weight_decay;
  double momentum = 0.0;   // sgd
  double dampening = 0.0;  // sgd
  bool nesterov = false;   // sgd
  double beta1 = 0.9;      // adam, adamw
  double beta2 = 0.999;    // adam, adamw
  double eps = 1e-8;       // adam, adamw
};

// The names make_optimizer() accepts: {"sgd", "adam", "adamw"}.
std::vector<std::string> optimizer_names();
// Builds the optimizer called `name` (case-insensitive); an unknown name throws
// naming it and listing the valid ones.
std::unique_ptr<Optimizer> make_optimizer(const std::string& name, NamedParameters params,
                                          const OptimizerConfig& config);
std::unique_ptr<Optimizer> make_optimizer(const std::string& name, NamedParameters params, double lr);

namespace detail {
std::string lower(std::string s);
std::string join(const std::vector<std::string>& names);  // "a, b, c"
}  // namespace detail

}  // namespace loom::optim
