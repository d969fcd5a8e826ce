#include "adapters/lora.h"
#include "adapters/lycoris.h"
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

// The dtype a module's change is computed in: that of its own (master) weights.
DType module_dtype(const LoraModule& m) {
  if (m.down.defined()) return m.down.dtype();
  if (!m.factors.empty()) return m.factors.begin()->second.dtype();
  return m.magnitude.dtype();
}

}  // namespace

const std::vector<std::string>& default_lora_targets() {
  static const std::vector<std::string> targets = {"to_q", "to_k", "to_v", "to_out.0"};
  return targets;
}

const char* module_kind_name(ModuleKind kind) {
  switch (kind) {
    case ModuleKind::LoRA: return "LoRA";
    case ModuleKind::LoHa: return "LoHa";
    case ModuleKind::LoKr: return "LoKr";
  }
  return "unknown";
}

double LoraModule::scale() const {
  if (kind != ModuleKind::LoRA) {
    // LyCORIS: a missing or zero alpha is alpha = r; a LoKr without factors has scale 1.
    if (rank <= 0 || !alpha || *alpha == 0.0) return 1.0;
  } else if (!alpha) {
    return 1.0;
  }
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
    if (m.kind == ModuleKind::LoRA) {
      params.emplace_back(path + ".lora_A.weight", m.down);
      params.emplace_back(path + ".lora_B.weight", m.up);
    }
    for (const auto& [name, v] : m.factors) params.emplace_back(path + "." + name, v);
    if (m.magnitude.defined()) params.emplace_back(path + "." + m.magnitude_name, m.magnitude);
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

namespace {

// y + the term of adapter `a` at `path`: w·s·B(A·x) for a plain LoRA, w·x·ΔWᵀ for LoHa, LoKr and
// DoRA; y itself when the adapter is disabled or weighted 0 (the output then stays bit for bit).
Variable add_adapter_term(Variable y, const nn::Linear& base, const Variable& x, const LoraAdapter& a,
                          const std::string& path) {
  if (!a.enabled()) return y;
  const double w = a.effective_weight(path);
  if (w == 0.0) return y;
  const LoraModule& m = a.modules().at(path);
  if (!m.plain()) {  // LoHa, LoKr, DoRA: the dense change of W (adapters/lycoris.h), [out, in]
    const Variable& wm = base.weight_matrix();
    const Variable delta = module_delta(m, wm.shape(), wm.tensor(), module_dtype(m), path);
    return add_linear(std::move(y), x, to_dtype(delta, x.dtype()), w);  // y + w·x·ΔWᵀ
  }
  // [..., in] -> [..., r] -> [..., out], scaled by w·s and accumulated into y by the up GEMM
  // itself; f32 masters are cast to the activations' dtype (tensor/precision.h), gradients
  // flow back in f32.
  return add_linear(std::move(y), linear(x, to_dtype(m.down, x.dtype())), to_dtype(m.up, x.dtype()), w * m.scale());
}

// Whether adapter `a` adds a plain LoRA term (enabled, weight ≠ 0, no DoRA) at `path`.
bool plain_term(const LoraAdapter& a, const std::string& path) {
  return a.enabled() && a.effective_weight(path) != 0.0 && a.modules().at(path).plain();
}

// ys[i] += w_i·s_i·B_i·(A_i·x) for the projections `which` (two or more, plain terms of `a`), with
// one down GEMM: [..., in] x [Σr, in]ᵀ -> [..., Σr], split into [..., r_i] views.
void add_shared_terms(std::vector<Variable>& ys, const Variable& x, const LoraAdapter& a,
                      const std::vector<std::string>& paths, const std::vector<size_t>& which) {
  std::vector<Variable> downs;
  std::vector<int64_t> ranks;
  for (size_t i : which) {
    const LoraModule& m = a.modules().at(paths[i]);
    downs.push_back(m.down);
    ranks.push_back(m.down.size(0));
  }
  const Variable z = linear(x, to_dtype(cat(downs, 0), x.dtype()));  // [..., Σr]
  const std::vector<Variable> zs = split(z, ranks, -1);               // [..., r_i] views of z
  for (size_t j = 0; j < which.size(); ++j) {
    const std::string& path = paths[which[j]];
    const LoraModule& m = a.modules().at(path);
    Variable& y = ys[which[j]];
    y = add_linear(std::move(y), zs[j], to_dtype(m.up, x.dtype()), a.effective_weight(path) * m.scale());
  }
}

}  // namespace

Variable lora_forward(const nn::Linear& base, const Variable& x, const std::vector<const LoraAdapter*>& adapters,
                      const std::string& path) {
  Variable y = base.base_forward(x);  // W·x + b
  for (const LoraAdapter* a : adapters) y = add_adapter_term(std::move(y), base, x, *a, path);
  return y;
}

std::vector<Variable> lora_forward_shared(const std::vector<const nn::Linear*>& bases, const Variable& x,
                                          const std::vector<std::vector<const LoraAdapter*>>& adapters,
                                          const std::vector<std::string>& paths, int64_t* shared_gemms) {
  const size_t n = bases.size();
  LOOM_CHECK(adapters.size() == n && paths.size() == n, "lora_forward_shared: ", n, " projections but ",
             adapters.size(), " adapter lists and ", paths.size(), " paths");
  std::vector<Variable> ys;
  for (const nn::Linear* base : bases) ys.push_back(base->base_forward(x));  // W·x + b
  // Each output adds its adapters' terms in its own list's order, as lora_forward does. Round by
  // round, an adapter that heads the rest of every list holding it (one exists: the lists follow
  // the set's order) is applied to all those projections at once, sharing one down GEMM among
  // those where it is a plain term.
  std::vector<size_t> next(n, 0);
  auto later_in_some_list = [&](const LoraAdapter* a) {
    for (size_t i = 0; i < n; ++i)
      if (next[i] < adapters[i].size() &&
          std::find(adapters[i].begin() + std::ptrdiff_t(next[i]) + 1, adapters[i].end(), a) != adapters[i].end())
        return true;
    return false;
  };
  for (;;) {
    const LoraAdapter* a = nullptr;
    bool unfinished = false;
    for (size_t i = 0; i < n && !a; ++i) {
      if (next[i] >= adapters[i].size()) continue;
      unfinished = true;
      if (!later_in_some_list(adapters[i][next[i]])) a = adapters[i][next[i]];
    }
    if (!unfinished) break;
    LOOM_CHECK(a != nullptr, "lora_forward_shared: the adapter lists of '", paths[0],
               "' and its peers are not in one order");
    std::vector<size_t> shared, alone;
    for (size_t i = 0; i < n; ++i) {
      if (next[i] >= adapters[i].size() || adapters[i][next[i]] != a) continue;
      ++next[i];
      const bool fits = plain_term(*a, paths[i]) &&  // stackable with the first: one dtype
                        (shared.empty() || a->modules().at(paths[i]).down.dtype() ==
                                               a->modules().at(paths[shared[0]]).down.dtype());
      (fits ? shared : alone).push_back(i);
    }
    if (shared.size() == 1) alone.push_back(shared[0]), shared.clear();
    if (!shared.empty()) {
      add_shared_terms(ys, x, *a, paths, shared);
      if (shared_gemms) ++*shared_gemms;
    }
    for (size_t i : alone) ys[i] = add_adapter_term(std::move(ys[i]), *bases[i], x, *a, paths[i]);
  }
  return ys;
}

Variable lora_conv_forward(const nn::Conv2d& base, const Variable& x, const std::vector<const LoraAdapter*>& adapters,
                           const std::string& path, bool with_bias) {
  Variable y = with_bias ? base.base_forward(x) : base.base_forward_without_bias(x);  // conv(x, W) (+ b)
  for (const LoraAdapter* a : adapters) {
    if (!a->enabled()) continue;
    const double w = a->effective_weight(path);
    if (w == 0.0) continue;
    const LoraModule& m = a->modules().at(path);
    if (!m.plain()) {  // LoHa, LoKr, DoRA: a conv with the dense change of W [out, in, kh, kw]
      const Tensor& wt = base.weight().tensor();
      const Variable delta = module_delta(m, wt.shape(), wt.reshape({wt.size(0), -1}), module_dtype(m), path);
      y = y + conv2d(x, reshape(to_dtype(delta, x.dtype()), wt.shape()), Variable(), base.params()) * w;
      continue;
    }
    // [N, in, H, W] -> conv A (base stride/padding) [N, r, oh, ow] -> 1×1 conv B [N, out, oh, ow], scaled by w·s
    // f32 masters are cast to the activations' dtype, as in lora_forward
    y = y + conv2d(conv2d(x, to_dtype(m.down, x.dtype()), Variable(), base.params()), to_dtype(m.up, x.dtype())) *
                (w * m.scale());
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
  Variable forward_without_bias(const nn::Conv2d& base, const Variable& x) const override {
    if (set_->fused()) return base.base_forward_without_bias(x);
    return lora_conv_forward(base, x, adapters_, path_, false);
  }
  bool is_base_forward() const override { return set_->fused(); }  // the adapters are inside W
  const LoraSet* owner() const { return set_; }

 private:
  const LoraSet* set_;
  std::string path_;
  std::vector<const LoraAdapter*> adapters_;
};

// Installed on each adapted projection: routes its forward through lora_forward.
class LoraExtension final : public nn::LinearExtension {
 public:
  LoraExtension(const LoraSet* set, std::string path, std::vector<const LoraAdapter*> adapters,
                std::atomic<int64_t>* shared_gemms)
      : set_(set), path_(std::move(path)), adapters_(std::move(adapters)), shared_gemms_(shared_gemms) {}
  Variable forward(const nn::Linear& base, const Variable& x) const override {
    if (set_->fused()) return base.base_forward(x);  // the adapters are inside W already
    return lora_forward(base, x, adapters_, path_);
  }
  // Projections of one input: lora_forward_shared when every one of them carries this set's
  // adapters (declined while fused, or when the set does not share inputs).
  std::vector<Variable> forward_shared(const std::vector<const nn::Linear*>& linears,
                                       const Variable& x) const override {
    if (set_->fused() || !set_->share_inputs()) return {};
    std::vector<std::vector<const LoraAdapter*>> adapters;
    std::vector<std::string> paths;
    for (const nn::Linear* linear : linears) {
      const auto* ext = dynamic_cast<const LoraExtension*>(linear->extension().get());
      if (!ext || ext->set_ != set_) return {};
      adapters.push_back(ext->adapters_);
      paths.push_back(ext->path_);
    }
    int64_t shared = 0;
    std::vector<Variable> ys = lora_forward_shared(linears, x, adapters, paths, &shared);
    *shared_gemms_ += shared;
    return ys;
  }
  const LoraSet* owner() const { return set_; }

 private:
  const LoraSet* set_;
  std::string path_;
  std::vector<const LoraAdapter*> adapters_;
  std::atomic<int64_t>* shared_gemms_;  // the set's counter (LoraSet::shared_down_gemms)
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

LoraAdapter& LoraSet::add(const std::string& name, const LoraConfig& config, Generator& gen) {
  check_not_fused("add");
  LOOM_CHECK(!name.empty() && !has(name), "LoRA: adapter name '", name, "' is empty or already in use");
  auto adapter = std::make_unique<LoraAdapter>(name);
  for (const auto& [path, linear] : linears_) {
    const bool targeted = std::any_of(config.targets.begin(), config.targets.end(),
                                      [&](const std::string& t) { return path_matches(path, t); });
    if (!targeted) continue;
    LoraModule m;
    m.rank = longest_match(config.rank_pattern, path).value_or(config.rank);
    LOOM_CHECK(m.rank > 0, "LoRA '", name, "': rank of '", path, "' must be positive, got ", m.rank);
    m.alpha = longest_match(config.alpha_pattern, path);
    if (!m.alpha) m.alpha = config.alpha;
    m.use_rslora = config.use_rslora;
    const Tensor& w = linear->weight().tensor();
    const DType master = master_dtype(w.dtype());  // f32 masters over bf16 / f16 base weights
    // A ~ N(0, 1/r), B = 0: the adapter starts as the identity change.
    m.down = Variable(Tensor::randn({m.rank, linear->in_features()}, gen, master, w.device(), 0.0,
                                    1.0 / double(m.rank)), true);
    m.up = Variable(Tensor::zeros({linear->out_features(), m.rank}, master, w.device()), true);
    adapter->add_module(path, std::move(m));
  }
  for (const auto& [path, conv] : convs_) {
    const bool targeted = std::any_of(config.targets.begin(), config.targets.end(),
                                      [&](const std::string& t) { return path_matches(path, t); });
    if (!targeted) continue;
    LoraModule m;
    m.rank = longest_match(config.rank_pattern, path).value_or(config.rank);
    LOOM_CHECK(m.rank > 0, "LoRA '", name, "': rank of '", path, "' must be positive, got ", m.rank);
    m.alpha = longest_match(config.alpha_pattern, path);
    if (!m.alpha) m.alpha = config.alpha;
    m.use_rslora = config.use_rslora;
    const Tensor& w = conv->weight().tensor();  // (out, in, kh, kw)
    const DType master = master_dtype(w.dtype());  // f32 masters over bf16 / f16 base weights
    m.down = Variable(Tensor::randn({m.rank, w.size(1), w.size(2), w.size(3)}, gen, master, w.device(), 0.0,
                                    1.0 / double(m.rank)), true);
    m.up = Variable(Tensor::zeros({w.size(0), m.rank, 1, 1}, master, w.device()), true);
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
    if (!m.plain()) {
      adapter->add_module(path, checked_lycoris_module(name, path, std::move(m)));
      continue;
    }
    if (auto conv = convs_.find(path); conv != convs_.end()) {
      LOOM_CHECK(m.down.defined() && m.up.defined(), "LoRA '", name, "': '", path, "' lacks its down or up weight");
      const Tensor& w = conv->second->weight().tensor();  // (out, in, kh, kw)
      const int64_t r = m.down.size(0);
      const Shape want_down{r, w.size(1), w.size(2), w.size(3)}, want_up{w.size(0), r, 1, 1};
      LOOM_CHECK(m.down.shape() == want_down, "LoRA '", name, "': '", path, ".lora_A.weight' has shape ",
                 m.down.shape(), ", the model's Conv2d needs ", want_down, " (wrong base model?)");
      LOOM_CHECK(m.up.shape() == want_up, "LoRA '", name, "': '", path, ".lora_B.weight' has shape ", m.up.shape(),
                 ", the model's Conv2d needs ", want_up, " (wrong base model?)");
      m.rank = r;
      m.down = Variable(m.down.tensor().to(master_dtype(w.dtype())).to(w.device()), true);
      m.up = Variable(m.up.tensor().to(master_dtype(w.dtype())).to(w.device()), true);
      adapter->add_module(path, std::move(m));
      continue;
    }
    auto it = linears_.find(path);
    LOOM_CHECK(it != linears_.end(), "LoRA '", name, "': the model has no Linear or Conv2d '", path,
               "' (wrong base model?)");
    const auto& linear = it->second;
    LOOM_CHECK(m.down.defined() && m.up.defined(), "LoRA '", name, "': '", path, "' lacks its down or up weight");
    const Shape want_down{m.down.size(0), linear->in_features()}, want_up{linear->out_features(), m.down.size(0)};
    LOOM_CHECK(m.down.shape() == want_down, "LoRA '", name, "': '", path, ".lora_A.weight' has shape ",
               m.down.shape(), ", the model needs ", want_down, " (wrong base model?)");
    LOOM_CHECK(m.up.shape() == want_up, "LoRA '", name, "': '", path, ".lora_B.weight' has shape ", m.up.shape(),
               ", the model needs ", want_up, " (wrong base model?)");
    const Tensor& w = linear->weight().tensor();
    m.rank = m.down.size(0);
    m.down = Variable(m.down.tensor().to(master_dtype(w.dtype())).to(w.device()), true);
    m.up = Variable(m.up.tensor().to(master_dtype(w.dtype())).to(w.device()), true);
    adapter->add_module(path, std::move(m));
  }
  model_->set_requires_grad(false);
  return insert(std::move(adapter));
}

LoraModule LoraSet::checked_lycoris_module(const std::string& name, const std::string& path, LoraModule m) const {
  Tensor w;
  if (auto conv = convs_.find(path); conv != convs_.end()) w = conv->second->weight().tensor();
  if (auto linear = linears_.find(path); linear != linears_.end()) w = linear->second->weight_matrix().tensor();
  LOOM_CHECK(w.defined(), module_kind_name(m.kind), " '", name, "': the model has no Linear or Conv2d '", path,
             "' (wrong base model?)");
  if (m.kind == ModuleKind::LoRA) {  // a LoRA with DoRA: the LoRA's own shapes first
    LOOM_CHECK(m.down.defined() && m.up.defined(), "LoRA '", name, "': '", path, "' lacks its down or up weight");
    const int64_t r = m.down.size(0);
    const bool ok = m.down.numel() == r * (w.numel() / w.size(0)) && m.up.size(0) == w.size(0) &&
                    m.up.numel() == w.size(0) * r;
    LOOM_CHECK(ok, "LoRA '", name, "': '", path, "' has down ", m.down.shape(), " and up ", m.up.shape(),
               ", which do not fit the weight ", w.shape(), " (wrong base model?)");
    m.rank = r;
  }
  check_module_shapes(name, path, m, w.shape());
  const DType master = master_dtype(w.dtype());
  auto place = [&](Variable& v) {
    if (v.defined()) v = Variable(v.tensor().to(master).to(w.device()), true);
  };
  place(m.down), place(m.up), place(m.magnitude);
  for (auto& [n, v] : m.factors) place(v);
  return m;
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
      linear->set_extension(std::make_shared<LoraExtension>(this, path, here, &shared_down_gemms_));
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
    if (!m.plain()) {  // the same dense change the forward adds, in f64
      const Tensor term = ops::mul_scalar(
          module_delta(m, base.shape(), base.reshape({base.size(0), -1}), DType::F64, path).tensor(), w);
      delta = delta.defined() ? ops::add(delta, term) : term;
      continue;
    }
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
