// SGD (PyTorch semantics; formulas in sgd.h).
#include "optim/sgd.h"

#include <cmath>

#include "tensor/ops.h"

namespace loom::optim {

namespace {

void check_options(const SGDOptions& o) {
  LOOM_CHECK(o.momentum >= 0, "sgd: momentum must be >= 0, got ", o.momentum);
  LOOM_CHECK(o.weight_decay >= 0, "sgd: weight_decay must be >= 0, got ", o.weight_decay);
  LOOM_CHECK(std::isfinite(o.dampening), "sgd: dampening must be finite, got ", o.dampening);
  LOOM_CHECK(!o.nesterov || (o.momentum > 0 && o.dampening == 0),
             "sgd: nesterov momentum requires momentum > 0 and dampening == 0 (got momentum ", o.momentum,
             ", dampening ", o.dampening, ")");
}

}  // namespace

SGD::SGD(NamedParameters params, const SGDOptions& options)
    : Optimizer(std::move(params), options.lr, "sgd"), options_(options) {
  check_options(options_);
  momentum_buffer_.resize(named_parameters().size());
}

SGDOptions SGD::options() const {
  SGDOptions o = options_;
  o.lr = lr();
  return o;
}

Tensor SGD::direction(size_t i, const Tensor& param, const Tensor& grad) {
  Tensor d = grad;
  if (options_.weight_decay != 0) d = ops::add(d, ops::mul_scalar(param, options_.weight_decay));
  if (options_.momentum == 0) return d;
  Tensor& buf = momentum_buffer_[i];
  if (!buf.defined()) {
    buf = d.clone();
  } else {
    buf = ops::add(ops::mul_scalar(buf, options_.momentum), ops::mul_scalar(d, 1.0 - options_.dampening));
  }
  return options_.nesterov ? ops::add(d, ops::mul_scalar(buf, options_.momentum)) : buf;
}

void SGD::step() {
  NoGradGuard no_grad;
  const auto& params = named_parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    const Variable& v = params[i].second;
    if (!v.grad().defined()) continue;
    const Tensor d = direction(i, v.tensor(), v.grad());
    assign(v, ops::sub(v.tensor(), ops::mul_scalar(d, lr())));
  }
}

std::map<std::string, Tensor> SGD::state_dict() const {
  std::map<std::string, Tensor> out;
  const auto& params = named_parameters();
  for (size_t i = 0; i < params.size(); ++i)
    if (momentum_buffer_[i].defined()) out[params[i].first + ".momentum_buffer"] = momentum_buffer_[i];
  return out;
}

void SGD::load_state_dict(const std::map<std::string, Tensor>& dict) {
  std::vector<Tensor> loaded(named_parameters().size());
  for (const auto& [key, t] : dict) {
    const size_t i = parse_key(key, {"momentum_buffer"}).first;
    loaded[i] = adopt_state(key, t, i);
  }
  momentum_buffer_ = std::move(loaded);
}

}  // namespace loom::optim
