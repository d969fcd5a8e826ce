#include "nn/module.h"

#include <algorithm>
#include <sstream>
#include <unordered_set>

namespace loom::nn {

namespace {

std::string join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

// Splits "a.b.c" into {"a", "b", "c"}.
std::vector<std::string> split_path(const std::string& dotted) {
  std::vector<std::string> parts;
  std::string::size_type start = 0;
  while (true) {
    const auto dot = dotted.find('.', start);
    parts.push_back(dotted.substr(start, dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return parts;
}

template <class T>
const T* find_named(const std::vector<std::pair<std::string, T>>& items, const std::string& name) {
  for (const auto& [n, v] : items)
    if (n == name) return &v;
  return nullptr;
}

// Replaces the tensor inside a parameter: the handle (and every copy of it) sees the new data.
void assign_data(const Variable& v, Tensor value) {
  v.impl()->data = std::move(value);
}

}  // namespace

std::string LoadReport::summary() const {
  std::ostringstream os;
  os << matched.size() << " matched, " << missing.size() << " missing, " << unexpected.size() << " unexpected, "
     << shape_mismatches.size() << " shape mismatches";
  return os.str();
}

// ---- registration ---------------------------------------------------------------------

void Module::check_new_name(const std::string& name, const char* what) const {
  LOOM_CHECK(!name.empty() && name.find('.') == std::string::npos, type_name(), ": invalid ", what, " name '",
             name, "' (must be non-empty, without '.')");
  const bool taken = find_named(params_, name) || find_named(buffers_, name) || find_named(children_, name);
  LOOM_CHECK(!taken, type_name(), ": cannot register ", what, " '", name, "': the name is already in use");
}

Variable Module::register_parameter(const std::string& name, Tensor value, bool requires_grad) {
  check_new_name(name, "parameter");
  LOOM_CHECK(value.defined(), type_name(), ": parameter '", name, "' is an undefined tensor");
  Variable v(std::move(value), requires_grad);
  params_.emplace_back(name, v);
  return v;
}

void Module::register_buffer(const std::string& name, Tensor value) {
  check_new_name(name, "buffer");
  LOOM_CHECK(value.defined(), type_name(), ": buffer '", name, "' is an undefined tensor");
  buffers_.emplace_back(name, std::move(value));
}

void Module::add_child(const std::string& name, std::shared_ptr<Module> module) {
  check_new_name(name, "module");
  LOOM_CHECK(module != nullptr, type_name(), ": module '", name, "' is null");
  LOOM_CHECK(module.get() != this, type_name(), ": module '", name, "' cannot be its own child");
  children_.emplace_back(name, std::move(module));
}

std::pair<Module*, std::string> Module::resolve_owner(const std::string& dotted_name) const {
  const auto dot = dotted_name.rfind('.');
  if (dot == std::string::npos) return {const_cast<Module*>(this), dotted_name};
  const std::string owner_path = dotted_name.substr(0, dot);
  const std::shared_ptr<Module> owner = find_module(owner_path);
  LOOM_CHECK(owner != nullptr, type_name(), ": no module '", owner_path, "' (looking up '", dotted_name, "')");
  return {owner.get(), dotted_name.substr(dot + 1)};
}

void Module::on_replace_module(const std::string&, const std::shared_ptr<Module>&) {}

void Module::replace_module(const std::string& dotted_name, std::shared_ptr<Module> module) {
  auto [owner, name] = resolve_owner(dotted_name);
  LOOM_CHECK(module != nullptr, "replace_module: replacement for '", dotted_name, "' is null");
  for (auto& [n, m] : owner->children_) {
    if (n != name) continue;
    owner->on_replace_module(name, module);
    m = std::move(module);
    return;
  }
  LOOM_FAIL("replace_module: ", owner->type_name(), " has no child '", name, "' (path '", dotted_name, "')");
}

void Module::set_parameter_data(const std::string& dotted_name, const Tensor& value) {
  const Variable p = find_parameter(dotted_name);
  LOOM_CHECK(p.defined(), "set_parameter_data: no parameter '", dotted_name, "' in ", type_name());
  LOOM_CHECK(value.defined() && value.shape() == p.shape(), "set_parameter_data: '", dotted_name, "' has shape ",
             p.shape(), ", the new tensor ", value.defined() ? value.str() : std::string("is undefined"));
  LOOM_CHECK(!p.requires_grad() || is_floating(value.dtype()), "set_parameter_data: '", dotted_name,
             "' requires grad and cannot hold ", value.dtype(), " values");
  p.zero_grad();
  assign_data(p, value);
}

// ---- lookup ------------------------------------------------------------------------------

std::shared_ptr<Module> Module::child(const std::string& name) const {
  if (const auto* m = find_named(children_, name)) return *m;
  std::ostringstream known;
  for (const auto& [n, m] : children_) known << (known.tellp() > 0 ? ", " : "") << n;
  LOOM_FAIL(type_name(), ": no child module '", name, "' (children: ", known.str().empty() ? "none" : known.str(),
            ")");
}

void Module::throw_wrong_child_type(const std::string& name) const {
  LOOM_FAIL(type_name(), ": child '", name, "' is a ", child(name)->type_name(), ", not the type asked for");
}

std::shared_ptr<Module> Module::find_module(const std::string& dotted_name) const {
  if (dotted_name.empty()) return nullptr;  // `this` is not owned by a shared_ptr we can hand out
  std::shared_ptr<Module> cur;
  const Module* at = this;
  for (const std::string& part : split_path(dotted_name)) {
    const auto* m = find_named(at->children_, part);
    if (!m) return nullptr;
    cur = *m;
    at = cur.get();
  }
  return cur;
}

Variable Module::find_parameter(const std::string& dotted_name) const {
  const auto dot = dotted_name.rfind('.');
  const Module* owner = this;
  std::shared_ptr<Module> holder;
  if (dot != std::string::npos) {
    holder = find_module(dotted_name.substr(0, dot));
    if (!holder) return Variable();
    owner = holder.get();
  }
  const auto* p = find_named(owner->params_, dot == std::string::npos ? dotted_name : dotted_name.substr(dot + 1));
  return p ? *p : Variable();
}

Variable Module::parameter(const std::string& name) const {
  const auto* p = find_named(params_, name);
  LOOM_CHECK(p != nullptr, type_name(), ": no parameter '", name, "'");
  return *p;
}

Tensor Module::buffer(const std::string& name) const {
  const auto* b = find_named(buffers_, name);
  LOOM_CHECK(b != nullptr, type_name(), ": no buffer '", name, "'");
  return *b;
}

// ---- iteration -----------------------------------------------------------------------------

std::vector<std::pair<std::string, std::shared_ptr<Module>>> Module::named_children() const { return children_; }

std::vector<std::pair<std::string, std::shared_ptr<Module>>> Module::named_modules() const {
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> out;
  for (const auto& [name, m] : children_) {
    out.emplace_back(name, m);
    for (auto& [sub, sm] : m->named_modules()) out.emplace_back(join(name, sub), std::move(sm));
  }
  return out;
}

std::vector<Module*> Module::subtree() {
  std::vector<Module*> out{this};
  for (const auto& entry : named_modules()) out.push_back(entry.second.get());
  return out;
}

std::vector<std::pair<std::string, Variable>> Module::all_named_parameters() const {
  std::vector<std::pair<std::string, Variable>> out(params_);
  for (const auto& [prefix, m] : named_modules())
    for (const auto& [name, p] : m->params_) out.emplace_back(join(prefix, name), p);
  return out;
}

std::vector<std::pair<std::string, Variable>> Module::named_parameters() const {
  std::vector<std::pair<std::string, Variable>> out = all_named_parameters();
  std::unordered_set<const VariableImpl*> seen;  // a shared parameter is listed once
  out.erase(std::remove_if(out.begin(), out.end(),
                           [&](const auto& e) { return !seen.insert(e.second.impl().get()).second; }),
            out.end());
  return out;
}

std::vector<Variable> Module::parameters() const {
  std::vector<Variable> out;
  for (auto& entry : named_parameters()) out.push_back(std::move(entry.second));
  return out;
}

std::vector<std::pair<std::string, Tensor>> Module::named_buffers() const {
  std::vector<std::pair<std::string, Tensor>> out(buffers_);
  for (const auto& [prefix, m] : named_modules())
    for (const auto& [name, b] : m->buffers_) out.emplace_back(join(prefix, name), b);
  return out;
}

int64_t Module::num_parameters(bool trainable_only) const {
  int64_t n = 0;
  for (const Variable& p : parameters())
    if (!trainable_only || p.requires_grad()) n += p.numel();
  return n;
}

// ---- state ------------------------------------------------------------------------------------

std::map<std::string, Tensor> Module::state_dict() const {
  std::map<std::string, Tensor> out;
  for (const auto& [name, p] : all_named_parameters()) out.emplace(name, p.tensor());
  for (const auto& [name, b] : named_buffers()) out.emplace(name, b);
  return out;
}

namespace {

std::string with_hint(const std::string& what) { return "load_state_dict: " + what + " (wrong base model?)"; }

// The strict-mode error for the first problem of the report (mismatches first).
[[noreturn]] void throw_load_error(const LoadReport& r, const std::map<std::string, Tensor>& model) {
  std::ostringstream os;
  if (!r.shape_mismatches.empty()) {
    const ShapeMismatch& m = r.shape_mismatches.front();
    os << "shape mismatch for '" << m.key << "': the model has " << m.expected << ", the loaded tensor is "
       << m.got;
  } else if (!r.missing.empty()) {
    os << "missing key '" << r.missing.front() << "' (the model expects shape " << model.at(r.missing.front()).shape()
       << ")";
  } else {
    os << "unexpected key '" << r.unexpected.front() << "' (not a parameter or buffer of the model)";
  }
  os << "; " << r.summary();
  throw Error(with_hint(os.str()));
}

}  // namespace

LoadReport Module::load_state_dict(const std::map<std::string, Tensor>& dict, bool strict) {
  const std::map<std::string, Tensor> model = state_dict();
  LoadReport r;
  for (const auto& [key, dst] : model) {
    const auto it = dict.find(key);
    if (it == dict.end()) {
      r.missing.push_back(key);
    } else if (!it->second.defined() || it->second.shape() != dst.shape()) {
      r.shape_mismatches.push_back({key, dst.shape(), it->second.defined() ? it->second.shape() : Shape{}});
    } else {
      r.matched.push_back(key);
    }
  }
  for (const auto& entry : dict)
    if (!model.count(entry.first)) r.unexpected.push_back(entry.first);
  if (strict && !r.ok()) throw_load_error(r, model);

  NoGradGuard no_grad;
  // Copy into the existing storage: dtype converted to the model's, device kept.
  for (const std::string& key : r.matched) model.at(key).copy_(dict.at(key));
  return r;
}

// ---- modes ----------------------------------------------------------------------------------------

void Module::train(bool on) {
  for (Module* m : subtree()) m->training_ = on;
}

void Module::set_requires_grad(bool on) {
  for (const Variable& p : parameters()) Variable(p).set_requires_grad(on);
}

void Module::zero_grad() {
  for (const Variable& p : parameters()) p.zero_grad();
}

Module& Module::to(Device device) {
  for (const Variable& p : parameters()) {
    if (p.grad().defined()) p.impl()->grad = p.grad().to(device);
    assign_data(p, p.tensor().to(device));
  }
  for (Module* m : subtree())
    for (auto& entry : m->buffers_) entry.second = entry.second.to(device);
  return *this;
}

Module& Module::to(DType dtype) {
  LOOM_CHECK(is_floating(dtype), type_name(), ".to: target dtype must be floating point, got ", dtype);
  for (const Variable& p : parameters()) {
    if (!is_floating(p.dtype())) continue;
    if (p.grad().defined()) p.impl()->grad = p.grad().to(dtype);
    assign_data(p, p.tensor().to(dtype));
  }
  for (Module* m : subtree())
    for (auto& entry : m->buffers_)
      if (is_floating(entry.second.dtype())) entry.second = entry.second.to(dtype);
  return *this;
}

// ---- containers -------------------------------------------------------------------------------------

std::shared_ptr<Module> ModuleList::at(int64_t i) const {
  LOOM_CHECK(i >= 0 && i < size_, "ModuleList: index ", i, " out of range for ", size_, " modules");
  return child(std::to_string(i));
}

std::shared_ptr<UnaryModule> Sequential::at(int64_t i) const {
  LOOM_CHECK(i >= 0 && i < size_, "Sequential: index ", i, " out of range for ", size_, " modules");
  return child_as<UnaryModule>(std::to_string(i));
}

void Sequential::on_replace_module(const std::string& name, const std::shared_ptr<Module>& module) {
  LOOM_CHECK(std::dynamic_pointer_cast<UnaryModule>(module) != nullptr, "Sequential: cannot replace '", name,
             "' with a ", module->type_name(), " (not a one-input module)");
}

Variable Sequential::forward(const Variable& x) const {
  Variable y = x;
  for (int64_t i = 0; i < size_; ++i) y = at(i)->forward(y);
  return y;
}

}  // namespace loom::nn
