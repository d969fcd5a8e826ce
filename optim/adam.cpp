// Adam and AdamW (PyTorch semantics; formulas in adam.h).
#include "optim/adam.h"

#include <cmath>


namespace loom::optim {

namespace {

void check_options(const AdamOptions& o, const char* who) {
  LOOM_CHECK(o.eps >= 0, who, ": eps must be >= 0, got ", o.eps);
  LOOM_CHECK(o.beta1 >= 0 && o.beta1 < 1, who, ": beta1 must be in [0, 1), got ", o.beta1);
  LOOM_CHECK(o.beta2 >= 0 && o.beta2 < 1, who, ": beta2 must be in [0, 1), got ", o.beta2);
  LOOM_CHECK(o.weight_decay >= 0, who, ": weight_decay must be >= 0, got ", o.weight_decay);
}

AdamOptions as_adam(const AdamWOptions& w) { return AdamOptions{w.lr, w.beta1, w.beta2, w.eps, w.weight_decay}; }

const std::vector<std::string>& fields() {
  static const std::vector<std::string> f{"exp_avg", "exp_avg_sq", "step"};
  return f;
}

// A step counter from a state tensor: one element, a whole number >= 0.
int64_t read_step(const std::string& key, const Tensor& t, const std::string& who) {
  LOOM_CHECK(t.defined() && t.numel() == 1, who, ".load_state_dict: key '", key,
             "' must hold one element (the step count), got ", t.defined() ? t.str() : "undefined");
  const double s = t.item();
  LOOM_CHECK(s >= 0 && s == std::floor(s) && s < 9.0e15, who, ".load_state_dict: key '", key,
             "' holds ", s, ", not a step count (a whole number >= 0)");
  return int64_t(s);
}

}  // namespace

Adam::Adam(NamedParameters params, const AdamOptions& options) : Adam(std::move(params), options, false) {}

Adam::Adam(NamedParameters params, const AdamOptions& options, bool decoupled)
    : Optimizer(std::move(params), options.lr, decoupled ? "adamw" : "adam"),
      options_(options),
      decoupled_(decoupled) {
  check_options(options_, decoupled ? "adamw" : "adam");
  state_.resize(named_parameters().size());
}

AdamOptions Adam::options() const {
  AdamOptions o = options_;
  o.lr = lr();
  return o;
}

int64_t Adam::step_count(const std::string& name) const {
  const auto& params = named_parameters();
  for (size_t i = 0; i < params.size(); ++i)
    if (params[i].first == name) return state_[i].step;
  LOOM_FAIL(who(), ".step_count: no parameter named '", name, "'");
}

// One fused update of every parameter with a gradient (formulas in adam.h); the
// bias corrections use each parameter's own step count.
void Adam::step() {
  NoGradGuard no_grad;
  const AdamOptions& o = options_;
  OptimizerUpdateArgs args;
  args.kind = decoupled_ ? OptimizerKind::AdamW : OptimizerKind::Adam;
  args.lr = lr();
  args.weight_decay = o.weight_decay;
  args.beta1 = o.beta1;
  args.beta2 = o.beta2;
  args.eps = o.eps;
  std::vector<Variable> owners;
  const auto& params = named_parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    const Variable& v = params[i].second;
    if (!v.grad().defined()) continue;
    State& s = state_[i];
    const Tensor& p = v.tensor();
    if (!s.exp_avg.defined()) {
      s.exp_avg = Tensor::zeros(p.shape(), p.dtype(), p.device());
      s.exp_avg_sq = Tensor::zeros(p.shape(), p.dtype(), p.device());
    }
    s.step += 1;
    const double bias1 = 1.0 - std::pow(o.beta1, double(s.step));
    const double bias2_sqrt = std::sqrt(1.0 - std::pow(o.beta2, double(s.step)));
    OptimizerTensor e;
    e.param = p;
    e.grad = v.grad();
    e.state1 = s.exp_avg;
    e.state2 = s.exp_avg_sq;
    e.step_size = lr() / bias1;
    e.inv_bias2_sqrt = 1.0 / bias2_sqrt;
    args.tensors.push_back(e);
    owners.push_back(v);
  }
  run_update(std::move(args), owners);
}

std::map<std::string, Tensor> Adam::state_dict() const {
  std::map<std::string, Tensor> out;
  const auto& params = named_parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    if (!state_[i].exp_avg.defined()) continue;
    const std::string& n = params[i].first;
    out[n + ".exp_avg"] = state_[i].exp_avg.clone();
    out[n + ".exp_avg_sq"] = state_[i].exp_avg_sq.clone();
    out[n + ".step"] = Tensor::scalar(double(state_[i].step), DType::F64);
  }
  return out;
}

void Adam::load_state_dict(const std::map<std::string, Tensor>& dict) {
  const auto& params = named_parameters();
  std::vector<State> loaded(params.size());
  std::vector<int> seen(params.size(), 0);  // fields found per parameter
  for (const auto& [key, t] : dict) {
    const auto [i, field] = parse_key(key, fields());
    ++seen[i];
    if (field == "step") loaded[i].step = read_step(key, t, who());
    if (field == "exp_avg") loaded[i].exp_avg = adopt_state(key, t, i);
    if (field == "exp_avg_sq") loaded[i].exp_avg_sq = adopt_state(key, t, i);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (seen[i] == 0 || seen[i] == 3) continue;
    for (const auto& f : fields())
      LOOM_CHECK(dict.count(params[i].first + "." + f), who(), ".load_state_dict: missing key '",
                 params[i].first, ".", f, "' (the other state of parameter '", params[i].first, "' is present)");
  }
  state_ = std::move(loaded);
}

AdamW::AdamW(NamedParameters params, const AdamWOptions& options)
    : Adam(std::move(params), as_adam(options), true) {}

AdamWOptions AdamW::options() const {
  const AdamOptions o = Adam::options();
  return AdamWOptions{o.lr, o.beta1, o.beta2, o.eps, o.weight_decay};
}

}  // namespace loom::optim
