// Reading LoRA files: against a model (parse_lora, load_lora) and without one (read_raw_lora).
#include <cmath>
#include <sstream>

#include "adapters/lycoris.h"
#include "io/adapter_detail.h"

namespace loom::io {

using adapters::LoraModule;
using namespace detail;

namespace {

// A LoRA module from its pieces, shapes checked against the weight (`weight` (out, in) for a
// Linear, (out, in, kh, kw) for a Conv2d: down (r, in, kh, kw), up (out, r, 1, 1)); problems go
// to the report and give nullopt.
std::optional<LoraModule> lora_module(const Pieces& p, const Shape& weight, AdapterLoadReport& report) {
  if (!p.down.defined() || !p.up.defined()) {  // half a pair (or an alpha or a magnitude alone) is unusable
    for (const std::string* k : {&p.down_key, &p.up_key})
      if (!k->empty()) report.unmatched.push_back(*k + " (its " + (k == &p.down_key ? "up" : "down") + " half is missing)");
    if (p.down_key.empty() && p.up_key.empty() && !p.magnitude_key.empty())
      report.malformed.push_back("key '" + p.magnitude_key + "' (a DoRA magnitude) has no LoRA or LyCORIS weights beside it");
    return std::nullopt;
  }
  const bool conv = weight.size() == 4;
  const int64_t rank = p.down.size(0);
  const std::optional<Tensor> down = conv ? std::optional<Tensor>(p.down) : as_matrix(p.down);
  const std::optional<Tensor> up = conv ? std::optional<Tensor>(p.up) : as_matrix(p.up);
  const Shape want_down = conv ? Shape{rank, weight[1], weight[2], weight[3]} : Shape{rank, weight[1]};
  const Shape want_up = conv ? Shape{weight[0], rank, 1, 1} : Shape{weight[0], rank};
  bool ok = true;
  if (!down || down->shape() != want_down) report.shape_mismatches.push_back({p.down_key, want_down, p.down.shape()}), ok = false;
  if (!up || up->shape() != want_up) report.shape_mismatches.push_back({p.up_key, want_up, p.up.shape()}), ok = false;
  if (!ok) return std::nullopt;
  report.matched.push_back(p.down_key);
  report.matched.push_back(p.up_key);
  LoraModule m;
  m.down = Variable(*down);
  m.up = Variable(*up);
  m.rank = rank;
  return m;
}

// Kohya names flatten dots to underscores; with a model they are resolved against its paths
// (module "" when the name is no module of the model).
// `name` receives the module name in diffusers' numbering.
std::optional<LoraKey> parse_kohya(const std::string& key, const std::map<std::string, std::string>& kohya_names,
                                   std::string& name) {
  const auto split = split_kohya_key(key);
  if (!split) return std::nullopt;
  name = split->first;
  if (is_sgm_kohya_name(name)) {  // SGM/LDM numbering (SDXL files of sd-scripts): diffusers' numbering
    const std::string path = kohya_to_path(name);
    if (!path.empty()) name = "lora_unet_" + underscored(path);
  }
  auto it = kohya_names.find(name);
  return LoraKey{it == kohya_names.end() ? "" : it->second, split->second, KeyFamily::Kohya, key.substr(key.find('.') + 1)};
}
}  // namespace

LoraWeights parse_lora(const TensorFile& file, const std::string& path, const nn::Module& model,
                       const AdapterLoadOptions& options) {
  LoraWeights out;
  AdapterLoadReport& report = out.report;
  report.file = path;
  report.notes = file.notes;  // e.g. an HDF5 file without checksums
  const auto weights = model_weight_shapes(model);  // every Linear and Conv2d: its weight's shape
  std::map<std::string, std::string> kohya_names;  // lora_unet_<full path> -> model path
  for (const auto& [p, l] : weights) kohya_names["lora_unet_" + underscored(join_path(options.prefix, p))] = p;
  const std::string kohya_prefix = options.prefix.empty() ? "lora_unet_" : "lora_unet_" + underscored(options.prefix) + "_";
  const bool loom_file = is_loom_file(file);

  std::map<std::string, Pieces> pieces;
  for (const auto& [key, tensor] : file.tensors) {
    const bool kohya = starts_with(key, "lora_unet_");
    if (is_text_encoder_key(key)) {
      report.text_encoder.push_back(key);  // another component of the pipeline: not for this model
      continue;
    }
    std::string kohya_name;
    std::optional<LoraKey> k = kohya ? parse_kohya(key, kohya_names, kohya_name) : parse_non_kohya(key);
    if (!k) {
      report.unmatched.push_back(key);
      continue;
    }
    std::string module;
    if (kohya) {
      if (k->module.empty()) {
        (starts_with(kohya_name + "_", kohya_prefix) ? report.unmatched : report.outside_prefix).push_back(key);
        continue;
      }
      module = k->module;
    } else if (options.prefix.empty()) {
      module = k->module;
    } else if (starts_with(k->module, options.prefix + ".")) {
      module = k->module.substr(options.prefix.size() + 1);
    } else {
      report.outside_prefix.push_back(key);
      continue;
    }
    if (!weights.count(module)) {
      report.unmatched.push_back(key);
      continue;
    }
    report.families.insert(loom_file ? KeyFamily::Loom : k->family);
    Pieces& p = pieces[module];
    if (k->role == Role::Alpha) {
      p.alpha = alpha_value(tensor, path, key);
      report.matched.push_back(key);
      continue;
    }
    add_piece(p, *k, key, tensor);
    if (!all_finite(tensor)) report.non_finite.push_back(key);
  }

  const PeftConfig peft = peft_config(file, path);
  for (auto& [module, p] : pieces) {
    const Shape& weight = weights.at(module);
    const adapters::ModuleKind kind = pieces_kind(p, path, module);
    std::optional<LoraModule> built =
        kind == adapters::ModuleKind::LoRA ? lora_module(p, weight, report) : std::nullopt;
    std::string problem;
    if (kind != adapters::ModuleKind::LoRA) {
      built = lycoris_module(p, kind, weight, module, problem);
      if (!built) report.malformed.push_back(problem);
    }
    if (built && !attach_magnitude(p, *built, weight, module, problem)) report.malformed.push_back(problem), built.reset();
    if (!built) continue;
    LoraModule m = std::move(*built);
    for (const auto& [name, key] : p.factor_keys) report.matched.push_back(key);
    if (m.magnitude.defined()) report.matched.push_back(p.magnitude_key);
    if (!m.plain())
      report.kinds[module] = std::string(adapters::module_kind_name(m.kind)) + (m.magnitude.defined() ? "+DoRA" : "");
    resolve_alpha(file, path, peft, join_path(options.prefix, module), p.alpha, m.alpha, m.use_rslora);
    if (m.alpha)
      report.alphas_found[module] = *m.alpha;
    else
      report.alphas_defaulted.push_back(module);
    out.modules[module] = std::move(m);
  }
  if (out.modules.empty() && !report.malformed.empty()) check_strict(report, path);  // the real reason first
  if (out.modules.empty()) {
    std::ostringstream os;
    os << "no LoRA key matches the model (" << file.tensors.size() << " tensors";
    if (!file.tensors.empty()) os << ", first key '" << file.tensors.front().first << "'";
    if (!options.prefix.empty()) os << ", prefix '" << options.prefix << "'";
    os << ")";
    strict_fail(path, os.str());
  }
  if (options.strict) check_strict(report, path);
  return out;
}

AdapterLoadReport load_lora(adapters::LoraSet& set, const std::string& name, const std::string& path,
                            const AdapterLoadOptions& options) {
  const TensorFile file = read_tensor_file(path);
  LoraWeights w = parse_lora(file, path, set.model(), options);
  if (auto it = file.attributes.find("base_fingerprint"); it != file.attributes.end()) {
    std::vector<std::string> paths;
    for (const auto& [p, m] : w.modules) paths.push_back(p);
    const auto* stored = std::get_if<std::string>(&it->second);
    if (stored && *stored != base_fingerprint(set.model(), paths))
      w.report.notes.push_back("trained on different base weights (fingerprint " + *stored + ")");
  }
  set.add_from_weights(name, std::move(w.modules));
  return w.report;
}

// ---- model-free reading -----------------------------------------------------------------------

namespace {
// The adapters-layer module of a raw one (tensors shared, no copies), for rank and scale.
LoraModule as_module(const RawLoraModule& raw) {
  LoraModule m;
  m.kind = raw.kind;
  if (raw.down.defined()) m.down = Variable(raw.down);
  if (raw.up.defined()) m.up = Variable(raw.up);
  for (const auto& [name, t] : raw.factors) m.factors[name] = Variable(t);
  m.alpha = raw.alpha;
  m.use_rslora = raw.use_rslora;
  m.rank = adapters::lycoris_rank(m);
  return m;
}
}  // namespace

int64_t RawLoraModule::rank() const { return as_module(*this).rank; }

double RawLoraModule::scale() const { return as_module(*this).scale(); }

std::string RawLoraModule::kind_text() const {
  return std::string(adapters::module_kind_name(kind)) + (magnitude.defined() ? "+DoRA" : "");
}

std::vector<const Tensor*> RawLoraModule::tensors() const {
  std::vector<const Tensor*> all;
  for (const Tensor* t : {&down, &up, &magnitude})
    if (t->defined()) all.push_back(t);
  for (const auto& [name, t] : factors) all.push_back(&t);
  return all;
}

namespace {
// The first factor a LoHa / LoKr module lacks ("" when complete).
std::string missing_factor(const Pieces& p, adapters::ModuleKind kind) {
  auto has = [&](const char* n) { return p.factors.count(n) > 0; };
  if (kind == adapters::ModuleKind::LoHa) {
    for (const auto& n : adapters::loha_factor_names())
      if (!p.factors.count(n)) return n;
    return "";
  }
  for (const char* w : {"lokr_w1", "lokr_w2"}) {
    const std::string a = std::string(w) + "_a", b = std::string(w) + "_b";
    if (has(w)) continue;
    if (!has(a.c_str())) return a;
    if (!has(b.c_str())) return b;
  }
  return "";
}
}  // namespace

RawLora read_raw_lora(const TensorFile& file, const std::string& path) {
  RawLora raw;
  const PeftConfig peft = peft_config(file, path);
  const bool loom_file = is_loom_file(file);
  std::map<std::string, Pieces> pieces;
  for (const auto& [key, tensor] : file.tensors) {
    std::optional<LoraKey> k;
    if (starts_with(key, "lora_unet_") || starts_with(key, "lora_te")) {
      const size_t dot = key.find('.');
      const std::string name = key.substr(0, dot);
      const std::string module = starts_with(key, "lora_unet_") ? kohya_to_path(name) : kohya_text_encoder_path(name);
      const std::string rest = dot == std::string::npos ? "" : key.substr(dot + 1);
      if (!module.empty() && (rest == "lora_down.weight" || rest == "lora_up.weight" || rest == "alpha"))
        k = LoraKey{module, rest == "alpha" ? Role::Alpha : rest == "lora_down.weight" ? Role::Down : Role::Up,
                    KeyFamily::Kohya};
      else if (const auto role = lycoris_role(rest); role && !module.empty())
        k = LoraKey{module, *role, KeyFamily::Kohya, rest};
    } else {
      k = parse_non_kohya(key);
    }
    if (!k) {
      raw.skipped.push_back(key);
      continue;
    }
    raw.families.insert(loom_file ? KeyFamily::Loom : k->family);
    Pieces& p = pieces[k->module];
    if (k->role == Role::Alpha)
      p.alpha = alpha_value(tensor, path, key);
    else
      add_piece(p, *k, key, tensor);
  }
  for (auto& [module, p] : pieces) {
    const adapters::ModuleKind kind = pieces_kind(p, path, module);
    if (kind != adapters::ModuleKind::LoRA) {
      RawLoraModule m;
      m.kind = kind;
      m.factors = p.factors;
      m.magnitude = p.magnitude;
      m.magnitude_name = p.magnitude_name;
      if (const std::string missing = missing_factor(p, kind); !missing.empty())
        throw FileError(path, "module '" + module + "' (" + adapters::module_kind_name(kind) + ") lacks its '" +
                                  missing + "' key (has " + p.factor_keys.begin()->second + ")");
      resolve_alpha(file, path, peft, module, p.alpha, m.alpha, m.use_rslora);
      raw.modules[module] = m;
      continue;
    }
    if (!p.down.defined() || !p.up.defined()) {
      for (const std::string* k : {&p.down_key, &p.up_key, &p.magnitude_key})
        if (!k->empty()) raw.skipped.push_back(*k);
      continue;
    }
    RawLoraModule m{p.down, p.up, std::nullopt, false};
    m.magnitude = p.magnitude;
    m.magnitude_name = p.magnitude_name;
    resolve_alpha(file, path, peft, module, p.alpha, m.alpha, m.use_rslora);
    raw.modules[module] = m;
  }
  return raw;
}

}  // namespace loom::io
