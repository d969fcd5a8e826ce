#include "nn/norm.h"

#include "autograd/ops.h"

namespace loom::nn {

namespace {
// (weight = 1, bias = 0) registered on `m`, shape [n].
void register_affine(Module& m, int64_t n, DType dtype, Device device, Variable& weight, Variable& bias) {
  weight = m.register_parameter("weight", Tensor::ones({n}, dtype, device));
  bias = m.register_parameter("bias", Tensor::zeros({n}, dtype, device));
}
}  // namespace

LayerNorm::LayerNorm(int64_t dim, double eps, bool elementwise_affine, DType dtype, Device device)
    : dim_(dim), eps_(eps) {
  LOOM_CHECK(dim > 0, "LayerNorm: dim must be positive, got ", dim);
  LOOM_CHECK(eps > 0, "LayerNorm: eps must be positive, got ", eps);
  if (elementwise_affine) register_affine(*this, dim, dtype, device, weight_, bias_);
}

Variable LayerNorm::forward(const Variable& x) const { return layer_norm(x, {dim_}, weight_, bias_, eps_); }

std::pair<Variable, Variable> LayerNorm::forward_after_add(const Variable& x, const Variable& residual) const {
  return add_layer_norm(x, residual, {dim_}, weight_, bias_, eps_);
}

GroupNorm::GroupNorm(int64_t groups, int64_t channels, double eps, bool affine, DType dtype, Device device)
    : groups_(groups), channels_(channels), eps_(eps) {
  LOOM_CHECK(groups > 0 && channels > 0 && channels % groups == 0, "GroupNorm: ", channels,
             " channels cannot be split into ", groups, " groups");
  LOOM_CHECK(eps > 0, "GroupNorm: eps must be positive, got ", eps);
  if (affine) register_affine(*this, channels, dtype, device, weight_, bias_);
}

void GroupNorm::check_input(const Variable& x) const {
  LOOM_CHECK(x.defined() && x.dim() >= 2 && x.size(1) == channels_, "GroupNorm: expected input [N, ", channels_,
             ", *], got ", x.defined() ? x.shape() : Shape{});
}

Variable GroupNorm::forward(const Variable& x) const {
  check_input(x);
  return group_norm(x, groups_, weight_, bias_, eps_);
}

Variable GroupNorm::forward_silu(const Variable& x, const Variable& shift) const {
  check_input(x);
  return group_norm_silu(x, groups_, weight_, bias_, eps_, shift);
}

Dropout::Dropout(double p) : p_(p), gen_(&default_generator()) {
  LOOM_CHECK(p >= 0.0 && p < 1.0, "Dropout: probability must be in [0, 1), got ", p);
}

Variable Dropout::forward(const Variable& x) const { return dropout(x, p_, is_training(), *gen_); }

void set_dropout_generator(Module& root, Generator& gen) {
  if (auto* d = dynamic_cast<Dropout*>(&root)) d->set_generator(gen);
  for (const auto& entry : root.named_modules())
    if (auto* d = dynamic_cast<Dropout*>(entry.second.get())) d->set_generator(gen);
}

}  // namespace loom::nn
