#include "adapters/lora.h"
#include "tensor/precision.h"

#include <algorithm>
#include <cmath>

#include "autograd/ops.h"
#include "tensor/ops.h"

namespace loom::adapters {

namespace {

bool path_matches(const std::string& path, const std::string& target) {
  if (path == target) return true;
  return path.size() > target.size() && path.compare(path.size() - target.size(), target.size(), target) == 0 &&
         path[path.size() - target.size() - 1] == '.';
}

// The value of the longest key of `patterns` matching `path`, if any.
template <typename V>
std::optional<V> longest_match(const std::map<std::string, V>& patterns, const std::string& path) {
  std::optional<V> found;
  size_t best = 0;
  for (const auto& [key, value] : patterns)
    if (path_matches(path, key) && key.size() >= best) found = value, best = key.size();
  return found;
}

}  // namespace

const std::vector<std::string>& default_lora_targets() {
  static const std::vector<std::string> targets = {"to_q", "to_k", "to_v", "to_out.0"};
  return targets;
}

double LoraModule::scale() const {
  if (!alpha) return 1.0;
  return use_rslora ? *alpha / std::sqrt(double(rank)) : *alpha / double(rank);
}

// ---- LoraAdapter --------------------------------------------------------------------

LoraModule& LoraAdapter::module(const std::string& path) {
  auto it = modules_.find(path);
  LOOM_CHECK(it != modules_.end(), "LoRA '", name_, "': no module '", path, "'");
  return it->second;
}

std::vector<std::pair<std::string, Variable>> LoraAdapter::named_parameters() const {
  std::vector<std::pair<std::string, Variable>> params;
  for (const auto& [path, m] : modules_) {
    params.emplace_back(path + ".lora_A.weight", m.down);
    params.emplace_back(path + ".lora_B.weight", m.up);
  }
  return params;
}

std::vector<Variable> LoraAdapter::parameters() const {
  std::vector<Variable> params;
  for (const auto& [name, v] : named_parameters()) params.push_back(v);
  return params;
}

namespace {
// Whether `pattern` occurs in `path` as whole dotted components ("transformer_blocks.1" matches
// "transformer_blocks.1.attn2.to_q" but not "transformer_blocks.10.attn2.to_q").
bool contains_components(const std::string& path, const std::string& pattern) {
  for (size_t pos = path.find(pattern); pos != std::string::npos; pos = path.find(pattern, pos + 1)) {
    const size_t end = pos + pattern.size();
    if ((pos == 0 || path[pos - 1] == '.') && (end == path.size() || path[end] == '.')) return true;
  }
  return false;
}
}  // namespace

double LoraAdapter::effective_weight(const std::string& path) const {
  double block = 1.0;
  size_t best = 0;
  for (const auto& [pattern, w] : block_weights_)
    if (contains_components(path, pattern) && pattern.size() >= best) block = w, best = pattern.size();
  return weight_ * block;
}

// ---- the choke point -------------------------------------------------------------------

Variable lora_forward(const nn::Linear& base, const Variable& x, const std::vector<const LoraAdapter*>& adapters,
                      const std::string& path) {
  Variable y = base.base_forward(x);  // W·x + b
  for (const LoraAdapter* a : adapters) {
    if (!a->enabled()) continue;
    const double w = a->effective_weight(path);
    if (w == 0.0) continue;  // skipped: the base output stays bit for bit
    const LoraModule& m = a->modules().at(path);
    // [..., in] -> [..., r] -> [..., out], scaled by w·s and accumulated into y by the up GEMM
    // itself; f32 masters are cast to the activations' dtype (tensor/precision.h), gradients
    // flow back in f32.
    y = add_linear(y, linear(x, to_dtype(m.down, x.dtype())), to_dtype(m.up, x.dtype()), w * m.scale());
  }
  return y;
}

Variable lora_conv_forward(const nn::Conv2d& base, const Variable& x, const std::vector<const LoraAdapter*>& adapters,
                           const std::string& path) {
  Variable y = base.base_forward(x);  // conv(x, W) + b
  for (const LoraAdapter* a : adapters) {
    if (!a->enabled()) continue;
    const double w = a->effective_weight(path);
    if (w == 0.0) continue;
    const LoraModule& m = a->modules().at(path);
    // [N, in, H, W] -> conv A (base stride/padding) [N, r, oh, ow] -> 1×1 conv B [N, out, oh, ow], scaled by w·s
    y = y + conv2d(conv2d(x, m.down, Variable(), base.params()), m.up) * (w * m.scale());
  }
  return y;
}

namespace {

// Installed on each adapted Conv2d: routes its forward through lora_conv_forward.
class LoraConvExtension final : public nn::Conv2dExtension {
 public:
  LoraConvExtension(const LoraSet* set, std::string path, std::vector<const LoraAdapter*> adapters)
      : set_(set), path_(std::move(path)), adapters_(std::move(adapters)) {}
  Variable forward(const nn::Conv2d& base, const Variable& x) const override {
    if (set_->fused()) return base.base_forward(x);
    return lora_conv_forward(base, x, adapters_, path_);
  }
  const LoraSet* owner() const { return set_; }

 private:
  const LoraSet* set_;
  std::string path_;
  std::vector<const LoraAdapter*> adapters_;
};

// Installed on each adapted projection: routes its forward through lora_forward.
class LoraExtension final : public nn::LinearExtension {
 public:
  LoraExtension(const LoraSet* set, std::string path, std::vector<const LoraAdapter*> adapters)
      : set_(set), path_(std::move(path)), adapters_(std::move(adapters)) {}
  Variable forward(const nn::Linear& base, const Variable& x) const override {
    if (set_->fused()) return base.base_forward(x);  // the adapters are inside W already
    return lora_forward(base, x, adapters_, path_);
  }
  const LoraSet* owner() const { return set_; }

 private:
  const LoraSet* set_;
  std::string path_;
  std::vector<const LoraAdapter*> adapters_;
};

}  // namespace

// ---- LoraSet ------------------------------------------------------------------------------

LoraSet::LoraSet(std::shared_ptr<nn::Module> model) : model_(std::move(model)) {
  LOOM_CHECK(model_ != nullptr, "LoraSet: null model");
  for (const auto& [path, module] : model_->named_modules()) {
    if (auto conv = std::dynamic_pointer_cast<nn::Conv2d>(module)) {
      LOOM_CHECK(!conv->extension(), "LoraSet: '", path, "' already carries adapters of another LoraSet");
      convs_[path] = conv;
      continue;
    }
    auto linear = std::dynamic_pointer_cast<nn::Linear>(module);
    if (!linear) continue;
    LOOM_CHECK(!linear->extension(), "LoraSet: '", path,
               "' already carries adapters of another LoraSet; a model holds one LoraSet at a time "
               "(add several adapters to the same set)");
    linears_[path] = linear;
  }
}

LoraSet::~LoraSet() {
  try {
    if (fused_) unfuse();
    adapters_.clear();
    refresh_extensions();
  } catch (...) {  // leave the model as it is rather than throw from a destructor
  }
}

LoraAdapter& LoraSet::insert(std::unique_ptr<LoraAdapter> adapter) {
  adapters_.push_back(std::move(adapter));
  refresh_extensions();
  return *adapters_.back();
}

namespace {

// A module an adapter can attach to, seen through the shape of its weight as a projection:
// [out, in] for a Linear (whatever its stored layout, e.g. a 1×1 conv's [out, in, 1, 1]) or
// [out, in, kh, kw] for a Conv2d. Its adapter has down [r, in(, kh, kw)] and up [out, r(, 1, 1)],
// kept in `adapter_dtype` on the weight's device: f32 masters over a low-precision Linear (the
// choke point casts them), the weight's own dtype for a Conv2d (its path does not cast).
struct AdaptTarget {
  const char* kind;  // "Linear" or "Conv2d"
  Shape weight_shape;
  Device device;
  DType adapter_dtype;
  Shape down_shape(int64_t r) const {
    Shape s = weight_shape;
    s[0] = r;
    return s;
  }
  Shape up_shape(int64_t r) const {
    Shape s(weight_shape.size(), 1);
    s[0] = weight_shape[0], s[1] = r;
    return s;
  }
};

AdaptTarget linear_target(const nn::Linear& l) {
  const Tensor& w = l.weight().tensor();
  return {"Linear", {l.out_features(), l.in_features()}, w.device(), master_dtype(w.dtype())};
}
AdaptTarget conv_target(const nn::Conv2d& c) {
  const Tensor& w = c.weight().tensor();
  return {"Conv2d", w.shape(), w.device(), w.dtype()};
}

// Every adaptable module by path: the Linears, then the Conv2ds (the order in which `add` draws
// the initial weights from its generator).
std::vector<std::pair<std::string, AdaptTarget>> adapt_targets(
    const std::map<std::string, std::shared_ptr<nn::Linear>>& linears,
    const std::map<std::string, std::shared_ptr<nn::Conv2d>>& convs) {
  std::vector<std::pair<std::string, AdaptTarget>> all;
  for (const auto& [path, linear] : linears) all.emplace_back(path, linear_target(*linear));
  for (const auto& [path, conv] : convs) all.emplace_back(path, conv_target(*conv));
  return all;
}

}  // namespace

LoraAdapter& LoraSet::add(const std::string& name, const LoraConfig& config, Generator& gen) {
  check_not_fused("add");
  LOOM_CHECK(!name.empty() && !has(name), "LoRA: adapter name '", name, "' is empty or already in use");
  auto adapter = std::make_unique<LoraAdapter>(name);
  for (const auto& [path, target] : adapt_targets(linears_, convs_)) {
    const bool targeted = std::any_of(config.targets.begin(), config.targets.end(),
                                      [&, &path = path](const std::string& t) { return path_matches(path, t); });
    if (!targeted) continue;
    LoraModule m;
    m.rank = longest_match(config.rank_pattern, path).value_or(config.rank);
    LOOM_CHECK(m.rank > 0, "LoRA '", name, "': rank of '", path, "' must be positive, got ", m.rank);
    m.alpha = longest_match(config.alpha_pattern, path);
    if (!m.alpha) m.alpha = config.alpha;
    m.use_rslora = config.use_rslora;
    const Device device = target.device;
    // A ~ N(0, 1/r), B = 0: the adapter starts as the identity change.
    m.down = Variable(Tensor::randn(target.down_shape(m.rank), gen, target.adapter_dtype, device, 0.0,
                                    1.0 / double(m.rank)), true);
    m.up = Variable(Tensor::zeros(target.up_shape(m.rank), target.adapter_dtype, device), true);
    adapter->add_module(path, std::move(m));
  }
  LOOM_CHECK(!adapter->modules().empty(), "LoRA '", name, "': no Linear or Conv2d of the model matches the targets ",
             [&] {
               std::string t;
               for (const auto& s : config.targets) t += (t.empty() ? "" : ", ") + s;
               return t;
             }());
  model_->set_requires_grad(false);  // only adapter parameters train
  return insert(std::move(adapter));
}

LoraAdapter& LoraSet::add_from_weights(const std::string& name, std::map<std::string, LoraModule> modules) {
  check_not_fused("add_from_weights");
  LOOM_CHECK(!name.empty() && !has(name), "LoRA: adapter name '", name, "' is empty or already in use");
  LOOM_CHECK(!modules.empty(), "LoRA '", name, "': no modules given");
  auto adapter = std::make_unique<LoraAdapter>(name);
  for (auto& [path, m] : modules) {
    const auto linear = linears_.find(path);
    const auto conv = convs_.find(path);
    LOOM_CHECK(linear != linears_.end() || conv != convs_.end(), "LoRA '", name, "': the model has no Linear or Conv2d '",
               path, "' (wrong base model?)");
    const AdaptTarget target = conv != convs_.end() ? conv_target(*conv->second) : linear_target(*linear->second);
    LOOM_CHECK(m.down.defined() && m.up.defined(), "LoRA '", name, "': '", path, "' lacks its down or up weight");
    const int64_t r = m.down.dim() > 0 ? m.down.size(0) : 0;
    const Shape want_down = target.down_shape(r), want_up = target.up_shape(r);
    LOOM_CHECK(m.down.shape() == want_down, "LoRA '", name, "': '", path, ".lora_A.weight' has shape ",
               m.down.shape(), ", the model's ", target.kind, " needs ", want_down, " (wrong base model?)");
    LOOM_CHECK(m.up.shape() == want_up, "LoRA '", name, "': '", path, ".lora_B.weight' has shape ", m.up.shape(),
               ", the model's ", target.kind, " needs ", want_up, " (wrong base model?)");
    const Device device = target.device;
    m.rank = r;
    m.down = Variable(m.down.tensor().to(target.adapter_dtype).to(device), true);
    m.up = Variable(m.up.tensor().to(target.adapter_dtype).to(device), true);
    adapter->add_module(path, std::move(m));
  }
  model_->set_requires_grad(false);
  return insert(std::move(adapter));
}

bool LoraSet::has(const std::string& name) const {
  return std::any_of(adapters_.begin(), adapters_.end(), [&](const auto& a) { return a->name() == name; });
}

LoraAdapter& LoraSet::adapter(const std::string& name) {
  for (auto& a : adapters_)
    if (a->name() == name) return *a;
  LOOM_FAIL("LoRA: no adapter named '", name, "' (have: ", [&] {
    std::string all;
    for (const auto& n : names()) all += (all.empty() ? "" : ", ") + n;
    return all.empty() ? std::string("none") : all;
  }(), ")");
}

std::vector<std::string> LoraSet::names() const {
  std::vector<std::string> n;
  for (const auto& a : adapters_) n.push_back(a->name());
  return n;
}

void LoraSet::remove(const std::string& name) {
  check_not_fused("remove");
  adapter(name);  // throws when absent
  adapters_.erase(std::remove_if(adapters_.begin(), adapters_.end(), [&](const auto& a) { return a->name() == name; }),
                  adapters_.end());
  refresh_extensions();
}

void LoraSet::set_weight(const std::string& name, double weight) {
  check_not_fused("set_weight");
  adapter(name).weight_ = weight;
}

void LoraSet::set_block_weight(const std::string& name, const std::string& pattern, double weight) {
  check_not_fused("set_block_weight");
  LOOM_CHECK(!pattern.empty(), "LoRA '", name, "': empty block pattern");
  adapter(name).block_weights_[pattern] = weight;
}

void LoraSet::enable(const std::string& name, bool on) {
  check_not_fused(on ? "enable" : "disable");
  adapter(name).enabled_ = on;
}

void LoraSet::check_not_fused(const char* op) const {
  LOOM_CHECK(!fused_, "LoRA ", op, ": the adapters are fused into the base weights; unfuse() first");
}

std::vector<const LoraAdapter*> LoraSet::adapters_at(const std::string& path) const {
  std::vector<const LoraAdapter*> here;
  for (const auto& a : adapters_)
    if (a->modules().count(path)) here.push_back(a.get());
  return here;
}

void LoraSet::refresh_extensions() {
  for (const auto& [path, conv] : convs_) {
    const std::vector<const LoraAdapter*> here = adapters_at(path);
    auto current = std::dynamic_pointer_cast<const LoraConvExtension>(conv->extension());
    if (!here.empty())
      conv->set_extension(std::make_shared<LoraConvExtension>(this, path, here));
    else if (current && current->owner() == this)
      conv->set_extension(nullptr);
  }
  for (const auto& [path, linear] : linears_) {
    const std::vector<const LoraAdapter*> here = adapters_at(path);
    auto current = std::dynamic_pointer_cast<const LoraExtension>(linear->extension());
    const bool ours = current && current->owner() == this;
    if (!here.empty())
      linear->set_extension(std::make_shared<LoraExtension>(this, path, here));
    else if (ours)
      linear->set_extension(nullptr);
  }
}

Tensor LoraSet::fused_delta(const std::string& path, const Tensor& base) const {
  Tensor delta;  // Σ w·s·B·A in f64, [out, in] (a conv's A flattened to [r, in·kh·kw], B to [out, r])
  for (const auto& a : adapters_) {
    if (!a->enabled() || !a->modules().count(path)) continue;
    const double w = a->effective_weight(path);
    if (w == 0.0) continue;
    const LoraModule& m = a->modules().at(path);
    const Tensor up = m.up.tensor().to(DType::F64), down = m.down.tensor().to(DType::F64);
    const Tensor term = ops::mul_scalar(ops::matmul(up.reshape({up.size(0), -1}), down.reshape({down.size(0), -1})),
                                        w * m.scale());
    delta = delta.defined() ? ops::add(delta, term) : term;
  }
  return delta.defined() ? delta.reshape(base.shape()) : delta;
}

void LoraSet::fuse() {
  check_not_fused("fuse");
  NoGradGuard no_grad;
  std::vector<std::pair<std::string, Tensor>> bases;  // every adaptable weight, Linear and Conv2d
  for (const auto& [path, linear] : linears_) bases.emplace_back(path, linear->weight().tensor());
  for (const auto& [path, conv] : convs_) bases.emplace_back(path, conv->weight().tensor());
  for (const auto& [path, base] : bases) {
    const Tensor delta = fused_delta(path, base);
    if (!delta.defined()) continue;
    const Tensor fused = ops::add(base.to(DType::F64), delta);
    fused_base_[path] = base;  // the untouched tensor itself: unfuse puts it back
    model_->set_parameter_data(path + ".weight", fused.to(base.dtype()));
  }
  fused_ = true;
}

void LoraSet::unfuse() {
  LOOM_CHECK(fused_, "LoRA unfuse: the adapters are not fused");
  for (const auto& [path, base] : fused_base_) model_->set_parameter_data(path + ".weight", base);
  fused_base_.clear();
  fused_ = false;
}

std::vector<std::pair<std::string, Variable>> LoraSet::trainable_parameters() const {
  std::vector<std::pair<std::string, Variable>> params;
  for (const auto& a : adapters_) {
    if (!a->enabled()) continue;
    for (auto& [name, v] : a->named_parameters()) params.emplace_back(a->name() + "." + name, v);
  }
  return params;
}

}  // namespace loom::adapters
