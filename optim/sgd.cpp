// SGD (PyTorch semantics; formulas in sgd.h).
#include "optim/sgd.h"

#include <cmath>


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

// One fused update of every parameter with a gradient (formulas in sgd.h).
void SGD::step() {
  NoGradGuard no_grad;
  OptimizerUpdateArgs args;
  args.kind = OptimizerKind::Sgd;
  args.lr = lr();
  args.weight_decay = options_.weight_decay;
  args.momentum = options_.momentum;
  args.dampening = options_.dampening;
  args.nesterov = options_.nesterov;
  std::vector<Variable> owners;
  const auto& params = named_parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    const Variable& v = params[i].second;
    if (!v.grad().defined()) continue;
    OptimizerTensor e;
    e.param = v.tensor();
    e.grad = v.grad();
    if (options_.momentum != 0) {
      Tensor& buf = momentum_buffer_[i];
      e.first = !buf.defined();  // the buffer starts as this step's direction
      if (e.first) buf = Tensor::empty(e.param.shape(), e.param.dtype(), e.param.device());
      e.state1 = buf;
    }
    args.tensors.push_back(e);
    owners.push_back(v);
  }
  run_update(std::move(args), owners);
}

std::map<std::string, Tensor> SGD::state_dict() const {
  std::map<std::string, Tensor> out;
  const auto& params = named_parameters();
  for (size_t i = 0; i < params.size(); ++i)
    if (momentum_buffer_[i].defined()) out[params[i].first + ".momentum_buffer"] = momentum_buffer_[i].clone();
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
