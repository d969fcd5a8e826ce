// Optimizer base: parameter validation, lr, state-key parsing, the factory.
#include "optim/optimizer.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>

#include "nn/module.h"
#include "optim/adam.h"
#include "optim/sgd.h"
#include "tensor/ops_fused.h"

namespace loom::optim {

namespace detail {
std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return s;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}
}  // namespace detail

NamedParameters trainable(const NamedParameters& params) {
  NamedParameters out;
  for (const auto& p : params)
    if (p.second.requires_grad()) out.push_back(p);
  return out;
}

NamedParameters trainable_parameters(const nn::Module& module) { return trainable(module.named_parameters()); }

namespace {

void check_lr(double lr, const std::string& who) {
  LOOM_CHECK(std::isfinite(lr) && lr >= 0, who, ": learning rate must be finite and >= 0, got ", lr);
}

// Names, handles and leafness; collects the frozen ones for one message.
void check_params(const NamedParameters& params, const std::string& who) {
  LOOM_CHECK(!params.empty(), who, ": empty parameter list");
  std::set<std::string> names;
  std::map<const VariableImpl*, std::string> seen;
  std::vector<std::string> frozen;
  for (const auto& [name, v] : params) {
    LOOM_CHECK(!name.empty(), who, ": a parameter has an empty name");
    LOOM_CHECK(names.insert(name).second, who, ": parameter name '", name, "' given twice");
    LOOM_CHECK(v.defined(), who, ": parameter '", name, "' is an undefined Variable");
    auto [it, fresh] = seen.emplace(v.impl().get(), name);
    LOOM_CHECK(fresh, who, ": parameters '", it->second, "' and '", name, "' are the same Variable");
    LOOM_CHECK(v.is_leaf(), who, ": parameter '", name, "' is not a leaf (the result of an op)");
    if (!v.requires_grad()) frozen.push_back(name);
  }
  LOOM_CHECK(frozen.empty(), who, ": parameters that do not require grad cannot be optimized: ",
             detail::join(frozen), " (filter with optim::trainable())");
}

}  // namespace

Optimizer::Optimizer(NamedParameters params, double lr, const std::string& who)
    : params_(std::move(params)), lr_(lr), who_(who) {
  check_params(params_, who_);
  check_lr(lr, who_);
}

void Optimizer::zero_grad() {
  for (auto& p : params_) p.second.zero_grad();
}

void Optimizer::set_lr(double lr) {
  check_lr(lr, who_);
  lr_ = lr;
}

void Optimizer::assign(const Variable& param, const Tensor& value) { param.tensor().copy_(value); }

void Optimizer::run_update(OptimizerUpdateArgs args, const std::vector<Variable>& owners) {
  LOOM_ASSERT(args.tensors.size() == owners.size());
  std::vector<size_t> copied;  // entries updated through a contiguous copy
  for (size_t k = 0; k < args.tensors.size(); ++k) {
    OptimizerTensor& e = args.tensors[k];
    e.grad = e.grad.contiguous();
    if (!e.param.is_contiguous()) {
      e.param = e.param.contiguous();
      copied.push_back(k);
    }
  }
  ops::optimizer_update(args);
  for (size_t k : copied) assign(owners[k], args.tensors[k].param);
}

std::vector<Variable> Optimizer::parameters() const {
  std::vector<Variable> out;
  out.reserve(params_.size());
  for (const auto& p : params_) out.push_back(p.second);
  return out;
}

std::pair<size_t, std::string> Optimizer::parse_key(const std::string& key,
                                                    const std::vector<std::string>& fields) const {
  const size_t dot = key.rfind('.');
  const std::string param = dot == std::string::npos ? std::string() : key.substr(0, dot);
  const std::string field = dot == std::string::npos ? key : key.substr(dot + 1);
  LOOM_CHECK(std::find(fields.begin(), fields.end(), field) != fields.end(), who_, ".load_state_dict: key '",
             key, "': unknown state field '", field, "' (", who_, " keeps: ", detail::join(fields), ")");
  for (size_t i = 0; i < params_.size(); ++i)
    if (params_[i].first == param) return {i, field};
  LOOM_FAIL(who_, ".load_state_dict: key '", key, "': no parameter named '", param,
            "' in this optimizer (state of another model?)");
}

Tensor Optimizer::adopt_state(const std::string& key, const Tensor& t, size_t i) const {
  const Tensor& p = params_[i].second.tensor();
  LOOM_CHECK(t.defined(), who_, ".load_state_dict: key '", key, "' holds an undefined tensor");
  LOOM_CHECK(t.shape() == p.shape(), who_, ".load_state_dict: key '", key, "' has shape ", t.shape(),
             " but parameter '", params_[i].first, "' has shape ", p.shape());
  LOOM_CHECK(is_floating(t.dtype()), who_, ".load_state_dict: key '", key, "' has non-float dtype ", t.dtype());
  return t.to(p.device()).to(p.dtype()).clone();
}

// ---- factory ----------------------------------------------------------------------------

std::vector<std::string> optimizer_names() { return {"sgd", "adam", "adamw"}; }

namespace {

std::unique_ptr<Optimizer> make_sgd(NamedParameters params, const OptimizerConfig& c) {
  SGDOptions o;
  o.lr = c.lr;
  o.momentum = c.momentum;
  o.dampening = c.dampening;
  o.nesterov = c.nesterov;
  o.weight_decay = c.weight_decay.value_or(o.weight_decay);
  return std::make_unique<SGD>(std::move(params), o);
}

template <class Opt, class Options>
std::unique_ptr<Optimizer> make_adam(NamedParameters params, const OptimizerConfig& c) {
  Options o;
  o.lr = c.lr;
  o.beta1 = c.beta1;
  o.beta2 = c.beta2;
  o.eps = c.eps;
  o.weight_decay = c.weight_decay.value_or(o.weight_decay);
  return std::make_unique<Opt>(std::move(params), o);
}

}  // namespace

std::unique_ptr<Optimizer> make_optimizer(const std::string& name, NamedParameters params,
                                          const OptimizerConfig& config) {
  const std::string n = detail::lower(name);
  if (n == "sgd") return make_sgd(std::move(params), config);
  if (n == "adam") return make_adam<Adam, AdamOptions>(std::move(params), config);
  if (n == "adamw") return make_adam<AdamW, AdamWOptions>(std::move(params), config);
  LOOM_FAIL("make_optimizer: unknown optimizer '", name, "' (valid: ", detail::join(optimizer_names()), ")");
}

std::unique_ptr<Optimizer> make_optimizer(const std::string& name, NamedParameters params, double lr) {
  OptimizerConfig config;
  config.lr = lr;
  return make_optimizer(name, std::move(params), config);
}

}  // namespace loom::optim
