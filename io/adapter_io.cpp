#include "io/adapter_io.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <sys/stat.h>

#include "adapters/custom_diffusion.h"
#include "nn/linear.h"
#include "tensor/ops.h"

namespace loom::io {

using adapters::LoraAdapter;
using adapters::LoraModule;
using nlohmann::json;

// ---- names ------------------------------------------------------------------------------

const char* family_name(KeyFamily f) {
  switch (f) {
    case KeyFamily::DiffusersLegacy: return "diffusers-legacy";
    case KeyFamily::Diffusers: return "diffusers";
    case KeyFamily::Peft: return "peft";
    case KeyFamily::Kohya: return "kohya";
    case KeyFamily::CustomDiffusion: return "custom-diffusion";
    case KeyFamily::Loom: return "loom";
  }
  return "unknown";
}

KeyFamily parse_family(const std::string& name) {
  if (name == "peft") return KeyFamily::Peft;
  if (name == "diffusers") return KeyFamily::Diffusers;
  if (name == "kohya") return KeyFamily::Kohya;
  if (name == "loom") return KeyFamily::Loom;
  LOOM_FAIL("unknown adapter format '", name, "' (expected diffusers, peft, kohya or loom)");
}

std::string AdapterLoadReport::summary() const {
  std::ostringstream os;
  os << file << ": " << matched.size() << " keys matched";
  if (!families.empty()) {
    os << " (";
    bool first = true;
    for (KeyFamily f : families) os << (first ? "" : ", ") << family_name(f), first = false;
    os << ")";
  }
  os << ", " << unmatched.size() << " unmatched, " << shape_mismatches.size() << " shape mismatches, "
     << outside_prefix.size() << " outside the prefix, " << alphas_found.size() << " alphas found, "
     << alphas_defaulted.size() << " defaulted (scale 1)";
  if (!non_finite.empty()) os << ", " << non_finite.size() << " with NaN/Inf";
  for (const auto& n : notes) os << "; " << n;
  return os.str();
}

bool all_finite(const Tensor& t) {
  for (double v : t.to_vector())
    if (!std::isfinite(v)) return false;
  return true;
}

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}
std::string underscored(std::string s) {
  std::replace(s.begin(), s.end(), '.', '_');
  return s;
}
std::string join_path(const std::string& prefix, const std::string& path) {
  return prefix.empty() ? path : prefix + "." + path;
}

// Every Linear (Conv1x1 included) of a model, by path.
std::map<std::string, std::shared_ptr<nn::Linear>> model_linears(const nn::Module& model) {
  std::map<std::string, std::shared_ptr<nn::Linear>> out;
  for (const auto& [path, m] : model.named_modules())
    if (auto l = std::dynamic_pointer_cast<nn::Linear>(m)) out[path] = l;
  return out;
}

enum class Role { Down, Up, Alpha };

// A LoRA key taken apart: the module's path in the full model (prefix included, no
// "unet."), what the tensor is, and the spelling it came in.
struct LoraKey {
  std::string module;
  Role role;
  KeyFamily family;
};

// Strips the component prefixes diffusers and PEFT put in front of UNet keys.
std::string strip_component(const std::string& key) {
  for (const char* p : {"base_model.model.unet.", "base_model.model.", "unet."})
    if (starts_with(key, p)) return key.substr(std::string(p).size());
  return key;
}

std::optional<LoraKey> parse_non_kohya(const std::string& raw) {
  const std::string key = strip_component(raw);
  auto cut = [&](const std::string& suffix) { return key.substr(0, key.size() - suffix.size()); };
  if (ends_with(key, ".lora_A.weight")) return LoraKey{cut(".lora_A.weight"), Role::Down, KeyFamily::Peft};
  if (ends_with(key, ".lora_B.weight")) return LoraKey{cut(".lora_B.weight"), Role::Up, KeyFamily::Peft};
  for (const char* ab : {".lora_A.", ".lora_B."}) {  // PEFT with an adapter name: ….lora_A.default.weight
    const size_t at = key.find(ab);
    if (at != std::string::npos && ends_with(key, ".weight") && key.find('.', at + 8) == key.size() - 7)
      return LoraKey{key.substr(0, at), ab[6] == 'A' ? Role::Down : Role::Up, KeyFamily::Peft};
  }
  const size_t proc = key.find(".processor.");
  if (proc != std::string::npos && (ends_with(key, "_lora.down.weight") || ends_with(key, "_lora.up.weight"))) {
    const bool down = ends_with(key, "_lora.down.weight");
    std::string proj = key.substr(proc + 11, key.size() - (proc + 11) - (down ? 17 : 15));
    if (proj == "to_out") proj = "to_out.0";
    return LoraKey{key.substr(0, proc) + "." + proj, down ? Role::Down : Role::Up, KeyFamily::DiffusersLegacy};
  }
  if (ends_with(key, ".lora.down.weight")) return LoraKey{cut(".lora.down.weight"), Role::Down, KeyFamily::Diffusers};
  if (ends_with(key, ".lora.up.weight")) return LoraKey{cut(".lora.up.weight"), Role::Up, KeyFamily::Diffusers};
  if (ends_with(key, ".alpha")) return LoraKey{cut(".alpha"), Role::Alpha, KeyFamily::Diffusers};
  return std::nullopt;
}

// Kohya names flatten dots to underscores; they are resolved against the model's paths.
std::optional<LoraKey> parse_kohya(const std::string& key, const std::map<std::string, std::string>& kohya_names) {
  const size_t dot = key.find('.');
  if (dot == std::string::npos) return std::nullopt;
  const std::string name = key.substr(0, dot), rest = key.substr(dot + 1);
  Role role;
  if (rest == "lora_down.weight")
    role = Role::Down;
  else if (rest == "lora_up.weight")
    role = Role::Up;
  else if (rest == "alpha")
    role = Role::Alpha;
  else
    return std::nullopt;
  auto it = kohya_names.find(name);
  return LoraKey{it == kohya_names.end() ? "" : it->second, role, KeyFamily::Kohya};
}

// LoRA settings from PEFT's adapter config in the safetensors metadata (keys with or without "unet.").
struct PeftConfig {
  std::optional<int64_t> r;
  std::optional<double> lora_alpha;
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  bool use_rslora = false;
  bool present = false;
};

PeftConfig peft_config(const TensorFile& file, const std::string& path) {
  PeftConfig c;
  auto it = file.metadata.find("lora_adapter_metadata");
  if (it == file.metadata.end()) return c;
  json j;
  try {
    j = json::parse(it->second);
  } catch (const json::exception& e) {
    throw FileError(path, std::string("lora_adapter_metadata is not valid JSON (") + e.what() + ")");
  }
  if (!j.is_object()) throw FileError(path, "lora_adapter_metadata is not a JSON object");
  auto get = [&](const std::string& k) -> const json* {
    for (const std::string& p : {std::string("unet."), std::string("")})
      if (j.contains(p + k) && !j.at(p + k).is_null()) return &j.at(p + k);
    return nullptr;
  };
  try {
    if (const json* v = get("r")) c.r = v->get<int64_t>();
    if (const json* v = get("lora_alpha")) c.lora_alpha = v->get<double>();
    if (const json* v = get("use_rslora")) c.use_rslora = v->get<bool>();
    if (const json* v = get("rank_pattern"))
      for (const auto& [k, r] : v->items()) c.rank_pattern[k] = r.get<int64_t>();
    if (const json* v = get("alpha_pattern"))
      for (const auto& [k, a] : v->items()) c.alpha_pattern[k] = a.get<double>();
  } catch (const json::exception& e) {
    throw FileError(path, std::string("lora_adapter_metadata has a field of the wrong type (") + e.what() + ")");
  }
  c.present = true;
  return c;
}

// The value of the longest pattern that is the module path or a '.'-separated suffix of it.
template <typename V>
std::optional<V> pattern_value(const std::map<std::string, V>& patterns, const std::string& module) {
  std::optional<V> found;
  size_t best = 0;
  for (const auto& [k, v] : patterns) {
    const bool hit = module == k || (ends_with(module, k) && module[module.size() - k.size() - 1] == '.');
    if (hit && k.size() >= best) found = v, best = k.size();
  }
  return found;
}

// Whether the file says it is loom's own HDF5 format.
bool is_loom_file(const TensorFile& file) {
  auto it = file.attributes.find("format");
  const std::string* format = it == file.attributes.end() ? nullptr : std::get_if<std::string>(&it->second);
  return format && *format == "loom";
}

// The alpha and scaling convention of the module at `full` (prefix included), from the first
// source that has them: loom's per-module group attributes, a `.alpha` key, PEFT's metadata.
void resolve_alpha(const TensorFile& file, const PeftConfig& peft, const std::string& full,
                   const std::optional<double>& key_alpha, std::optional<double>& alpha, bool& use_rslora) {
  alpha.reset();
  use_rslora = false;
  if (is_loom_file(file) && file.group_attributes.count(full)) {
    const Attributes& a = file.group_attributes.at(full);
    if (a.count("alpha") && std::get_if<double>(&a.at("alpha"))) alpha = std::get<double>(a.at("alpha"));
    if (a.count("scaling") && std::get_if<std::string>(&a.at("scaling")))
      use_rslora = std::get<std::string>(a.at("scaling")) == "alpha/sqrt(r)";
  }
  if (!alpha) alpha = key_alpha;
  if (!alpha && peft.present) {
    alpha = pattern_value(peft.alpha_pattern, full);
    if (!alpha) alpha = peft.lora_alpha;
    use_rslora = peft.use_rslora;
  }
}

// A 2-D LoRA matrix from a 2-D or (·, ·, 1, 1) tensor.
std::optional<Tensor> as_matrix(const Tensor& t) {
  if (t.dim() == 2) return t;
  if (t.dim() == 4 && t.size(2) == 1 && t.size(3) == 1) return t.reshape({t.size(0), t.size(1)});
  return std::nullopt;
}

double scalar_value(const Tensor& t) { return t.numel() == 1 ? t.item() : NAN; }

// One module's pieces as they are collected from the file.
struct Pieces {
  std::string down_key, up_key;
  Tensor down, up;
  std::optional<double> alpha;
};

[[noreturn]] void strict_fail(const std::string& path, const std::string& problem) {
  throw FileError(path, problem + " (wrong base model or prefix?)");
}

void check_strict(const AdapterLoadReport& r, const std::string& path) {
  if (!r.shape_mismatches.empty()) {
    const auto& m = r.shape_mismatches.front();
    std::ostringstream os;
    os << "key '" << m.key << "' has shape " << m.got << " but the model needs " << m.expected;
    strict_fail(path, os.str());
  }
  if (!r.unmatched.empty())
    strict_fail(path, "key '" + r.unmatched.front() + "' matches no module of the model" +
                          (r.unmatched.size() > 1 ? " (and " + std::to_string(r.unmatched.size() - 1) + " more)" : ""));
  if (!r.non_finite.empty()) throw FileError(path, "key '" + r.non_finite.front() + "' holds NaN or Inf values");
}

}  // namespace

// ---- reading LoRA ---------------------------------------------------------------------------

LoraWeights parse_lora(const TensorFile& file, const std::string& path, const nn::Module& model,
                       const AdapterLoadOptions& options) {
  LoraWeights out;
  AdapterLoadReport& report = out.report;
  report.file = path;
  const auto linears = model_linears(model);
  std::map<std::string, std::string> kohya_names;  // lora_unet_<full path> -> model path
  for (const auto& [p, l] : linears) kohya_names["lora_unet_" + underscored(join_path(options.prefix, p))] = p;
  const std::string kohya_prefix = options.prefix.empty() ? "lora_unet_" : "lora_unet_" + underscored(options.prefix) + "_";
  const bool loom_file = is_loom_file(file);

  std::map<std::string, Pieces> pieces;
  for (const auto& [key, tensor] : file.tensors) {
    const bool kohya = starts_with(key, "lora_unet_");
    if (starts_with(key, "lora_te") || starts_with(key, "text_encoder")) {
      report.outside_prefix.push_back(key);  // another component of the pipeline
      continue;
    }
    std::optional<LoraKey> k = kohya ? parse_kohya(key, kohya_names) : parse_non_kohya(key);
    if (!k) {
      report.unmatched.push_back(key);
      continue;
    }
    std::string module;
    if (kohya) {
      if (k->module.empty()) {
        (starts_with(key, kohya_prefix) ? report.unmatched : report.outside_prefix).push_back(key);
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
    if (!linears.count(module)) {
      report.unmatched.push_back(key);
      continue;
    }
    report.families.insert(loom_file ? KeyFamily::Loom : k->family);
    Pieces& p = pieces[module];
    if (k->role == Role::Alpha) {
      p.alpha = scalar_value(tensor);
      report.matched.push_back(key);
      continue;
    }
    (k->role == Role::Down ? p.down : p.up) = tensor;
    (k->role == Role::Down ? p.down_key : p.up_key) = key;
    if (!all_finite(tensor)) report.non_finite.push_back(key);
  }

  const PeftConfig peft = peft_config(file, path);
  for (auto& [module, p] : pieces) {
    if (!p.down.defined() || !p.up.defined()) {  // half a pair (or an alpha alone) is unusable
      for (const std::string* k : {&p.down_key, &p.up_key})
        if (!k->empty()) report.unmatched.push_back(*k + " (its " + (k == &p.down_key ? "up" : "down") + " half is missing)");
      continue;
    }
    const auto& linear = linears.at(module);
    const std::optional<Tensor> down = as_matrix(p.down), up = as_matrix(p.up);
    const int64_t rank = p.down.size(0);
    const Shape want_down{rank, linear->in_features()}, want_up{linear->out_features(), rank};
    bool ok = true;
    if (!down || down->shape() != want_down) report.shape_mismatches.push_back({p.down_key, want_down, p.down.shape()}), ok = false;
    if (!up || up->shape() != want_up) report.shape_mismatches.push_back({p.up_key, want_up, p.up.shape()}), ok = false;
    if (!ok) continue;
    report.matched.push_back(p.down_key);
    report.matched.push_back(p.up_key);
    LoraModule m;
    m.down = Variable(*down);
    m.up = Variable(*up);
    m.rank = rank;
    resolve_alpha(file, peft, join_path(options.prefix, module), p.alpha, m.alpha, m.use_rslora);
    if (m.alpha)
      report.alphas_found[module] = *m.alpha;
    else
      report.alphas_defaulted.push_back(module);
    out.modules[module] = std::move(m);
  }
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

double RawLoraModule::scale() const {
  if (!alpha) return 1.0;
  return use_rslora ? *alpha / std::sqrt(double(rank())) : *alpha / double(rank());
}

std::string kohya_to_path(const std::string& kohya_name) {
  if (!starts_with(kohya_name, "lora_unet_")) return "";
  // Words of diffusers UNet paths that contain underscores, longest first.
  static const std::vector<std::string> words = {
      "transformer_blocks", "down_blocks", "up_blocks", "mid_block", "add_k_proj", "add_v_proj", "to_out",
      "proj_in",            "proj_out",    "to_q",      "to_k",      "to_v",       "norm_cross", "group_norm"};
  std::vector<std::string> tokens;
  std::stringstream ss(kohya_name.substr(10));
  for (std::string t; std::getline(ss, t, '_');) tokens.push_back(t);
  std::string path;
  for (size_t i = 0; i < tokens.size();) {
    std::string word = tokens[i];
    size_t used = 1;
    for (const std::string& w : words) {  // the longest vocabulary word starting here
      const size_t parts = size_t(std::count(w.begin(), w.end(), '_')) + 1;
      if (i + parts > tokens.size()) continue;
      std::string joined = tokens[i];
      for (size_t k = 1; k < parts; ++k) joined += "_" + tokens[i + k];
      if (joined == w && parts > used) word = w, used = parts;
    }
    path += (path.empty() ? "" : ".") + word;
    i += used;
  }
  return path;
}

RawLora read_raw_lora(const TensorFile& file, const std::string& path) {
  RawLora raw;
  const PeftConfig peft = peft_config(file, path);
  const bool loom_file = is_loom_file(file);
  std::map<std::string, Pieces> pieces;
  for (const auto& [key, tensor] : file.tensors) {
    std::optional<LoraKey> k;
    if (starts_with(key, "lora_unet_")) {
      const size_t dot = key.find('.');
      const std::string module = kohya_to_path(key.substr(0, dot));
      const std::string rest = dot == std::string::npos ? "" : key.substr(dot + 1);
      if (!module.empty() && (rest == "lora_down.weight" || rest == "lora_up.weight" || rest == "alpha"))
        k = LoraKey{module, rest == "alpha" ? Role::Alpha : rest == "lora_down.weight" ? Role::Down : Role::Up,
                    KeyFamily::Kohya};
    } else if (!starts_with(key, "lora_te") && !starts_with(key, "text_encoder")) {
      k = parse_non_kohya(key);
    }
    if (!k) {
      raw.skipped.push_back(key);
      continue;
    }
    raw.families.insert(loom_file ? KeyFamily::Loom : k->family);
    Pieces& p = pieces[k->module];
    if (k->role == Role::Alpha)
      p.alpha = scalar_value(tensor);
    else
      (k->role == Role::Down ? p.down : p.up) = tensor, (k->role == Role::Down ? p.down_key : p.up_key) = key;
  }
  for (auto& [module, p] : pieces) {
    if (!p.down.defined() || !p.up.defined()) {
      for (const std::string* k : {&p.down_key, &p.up_key})
        if (!k->empty()) raw.skipped.push_back(*k);
      continue;
    }
    RawLoraModule m{p.down, p.up, std::nullopt, false};
    resolve_alpha(file, peft, module, p.alpha, m.alpha, m.use_rslora);
    raw.modules[module] = m;
  }
  return raw;
}

// ---- writing LoRA -----------------------------------------------------------------------------

namespace {

std::string peft_metadata(const RawLora& lora) {
  const RawLoraModule& first = lora.modules.begin()->second;
  // lora_alpha giving each module its scale under PEFT's convention (alpha/r, or alpha/√r with rsLoRA)
  auto peft_alpha = [&](const RawLoraModule& m) {
    return m.scale() * (first.use_rslora ? std::sqrt(double(m.rank())) : double(m.rank()));
  };
  json j;
  j["unet.r"] = first.rank();
  j["unet.lora_alpha"] = peft_alpha(first);
  j["unet.use_rslora"] = first.use_rslora;
  json ranks = json::object(), alphas = json::object(), targets = json::array();
  std::set<std::string> names;
  for (const auto& [path, m] : lora.modules) {
    if (m.rank() != first.rank()) ranks[path] = m.rank();
    if (peft_alpha(m) != peft_alpha(first)) alphas[path] = peft_alpha(m);
    const std::string last = path.substr(path.rfind('.') + 1);
    names.insert(last == "0" && path.size() > 9 && ends_with(path, "to_out.0") ? "to_out.0" : last);
  }
  for (const auto& n : names) targets.push_back(n);
  j["unet.rank_pattern"] = ranks;
  j["unet.alpha_pattern"] = alphas;
  j["unet.target_modules"] = targets;
  return j.dump(2);
}

// The raw form of an adapter of `model`: full paths, 4-D tensors for 1×1 convs.
RawLora raw_from_adapter(const LoraAdapter& adapter, const nn::Module& model, const std::string& prefix) {
  LOOM_CHECK(!adapter.modules().empty(), "save_lora: adapter '", adapter.name(), "' has no modules");
  RawLora raw;
  for (const auto& [path, m] : adapter.modules()) {
    const bool conv = std::dynamic_pointer_cast<nn::Conv1x1>(model.find_module(path)) != nullptr;
    auto host = [&](const Variable& v) {
      const Tensor t = v.tensor().to(Device::cpu()).contiguous();
      return conv ? t.reshape({t.size(0), t.size(1), 1, 1}) : t;
    };
    raw.modules[join_path(prefix, path)] = RawLoraModule{host(m.down), host(m.up), m.alpha, m.use_rslora};
  }
  return raw;
}

void write_raw_lora(const std::string& path, const RawLora& lora, KeyFamily family, Attributes root) {
  std::map<std::string, std::string> metadata;
  const auto tensors = raw_lora_tensors(lora, family, &metadata);
  if (family != KeyFamily::Loom) {
    write_safetensors(path, tensors, metadata);
    return;
  }
  std::map<std::string, Attributes> groups;
  std::set<std::string> targets;
  for (const auto& [p, m] : lora.modules) {
    Attributes a{{"rank", m.rank()}, {"scaling", std::string(!m.alpha ? "1" : m.use_rslora ? "alpha/sqrt(r)" : "alpha/r")}};
    if (m.alpha) a["alpha"] = *m.alpha;
    groups[p] = a;
    targets.insert(ends_with(p, "to_out.0") ? "to_out.0" : p.substr(p.find_last_of('.') + 1));
  }
  std::string target_list;
  for (const auto& t : targets) target_list += (target_list.empty() ? "" : ",") + t;
  root["format"] = std::string("loom");
  root["format_version"] = int64_t(1);
  root["kind"] = std::string("lora");
  root["targets"] = target_list;
  write_hdf5(path, tensors, root, groups);
}

}  // namespace

std::vector<std::pair<std::string, Tensor>> raw_lora_tensors(const RawLora& lora, KeyFamily family,
                                                             std::map<std::string, std::string>* metadata) {
  LOOM_CHECK(!lora.modules.empty(), "LoRA writer: no modules to write");
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [full, m] : lora.modules) {
    // alpha such that alpha / r is the module's scale: the kohya and diffusers convention
    const Tensor alpha = Tensor::scalar(m.scale() * double(m.rank()), DType::F32);
    switch (family) {
      case KeyFamily::Peft:
        out.emplace_back("unet." + full + ".lora_A.weight", m.down);
        out.emplace_back("unet." + full + ".lora_B.weight", m.up);
        break;
      case KeyFamily::Loom:
        out.emplace_back(full + ".lora_A.weight", m.down);
        out.emplace_back(full + ".lora_B.weight", m.up);
        break;
      case KeyFamily::Diffusers:
        out.emplace_back("unet." + full + ".lora.down.weight", m.down);
        out.emplace_back("unet." + full + ".lora.up.weight", m.up);
        out.emplace_back("unet." + full + ".alpha", alpha);
        break;
      case KeyFamily::Kohya:
        out.emplace_back("lora_unet_" + underscored(full) + ".lora_down.weight", m.down);
        out.emplace_back("lora_unet_" + underscored(full) + ".lora_up.weight", m.up);
        out.emplace_back("lora_unet_" + underscored(full) + ".alpha", alpha);
        break;
      default:
        LOOM_FAIL("LoRA writer: cannot write LoRA weights as ", family_name(family));
    }
  }
  if (metadata) {
    (*metadata)["format"] = "pt";
    if (family == KeyFamily::Peft) (*metadata)["lora_adapter_metadata"] = peft_metadata(lora);
  }
  return out;
}

std::vector<std::pair<std::string, Tensor>> lora_tensors(const LoraAdapter& adapter, const nn::Module& model,
                                                         KeyFamily family, const std::string& prefix,
                                                         std::map<std::string, std::string>* metadata) {
  return raw_lora_tensors(raw_from_adapter(adapter, model, prefix), family, metadata);
}

void save_lora(const LoraAdapter& adapter, const nn::Module& model, const std::string& path, KeyFamily family,
               const std::string& prefix) {
  for (const auto& [name, v] : adapter.named_parameters())
    LOOM_CHECK(all_finite(v.tensor()), "save_lora: '", name, "' holds NaN or Inf; refusing to write ", path);
  std::vector<std::string> paths;
  for (const auto& [p, m] : adapter.modules()) paths.push_back(p);
  write_raw_lora(path, raw_from_adapter(adapter, model, prefix), family,
                 {{"adapter", adapter.name()}, {"prefix", prefix}, {"base_fingerprint", base_fingerprint(model, paths)}});
}

void convert_adapter_file(const std::string& in, const std::string& out, KeyFamily family) {
  const TensorFile file = read_tensor_file(in);
  if (is_custom_diffusion_file(file)) {
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const auto& [key, t] : file.tensors) tensors.emplace_back(strip_component(key), t);
    if (family == KeyFamily::Loom)
      write_hdf5(out, tensors, {{"format", std::string("loom")}, {"format_version", int64_t(1)},
                                {"kind", std::string("custom_diffusion")}});
    else
      write_safetensors(out, tensors, {{"format", "pt"}});
    return;
  }
  const RawLora raw = read_raw_lora(file, in);
  if (raw.modules.empty()) throw FileError(in, "holds no LoRA or Custom Diffusion weights to convert");
  for (const auto& [p, m] : raw.modules)
    for (const Tensor* t : {&m.down, &m.up})
      if (!all_finite(*t)) throw FileError(in, "module '" + p + "' holds NaN or Inf values");
  write_raw_lora(out, raw, family, {});
}

// ---- Custom Diffusion --------------------------------------------------------------------------

bool is_custom_diffusion_file(const TensorFile& file) {
  for (const auto& [key, t] : file.tensors)
    if (key.find("_custom_diffusion") != std::string::npos) return true;
  return false;
}

AdapterLoadReport load_custom_diffusion(nn::Module& model, const std::string& path, const AdapterLoadOptions& options) {
  const TensorFile file = read_tensor_file(path);
  AdapterLoadReport report;
  report.file = path;
  report.families.insert(KeyFamily::CustomDiffusion);
  bool has_q = false;
  for (const auto& [key, t] : file.tensors) has_q = has_q || key.find("to_q_custom_diffusion") != std::string::npos;
  bool installed = false;
  for (const auto& [name, p] : model.named_parameters()) installed = installed || name.find("_custom_diffusion") != std::string::npos;
  if (!installed) adapters::apply_custom_diffusion(model, has_q ? "crossattn" : "crossattn_kv");
  std::vector<std::pair<Variable, Tensor>> assign;
  for (const auto& [raw, tensor] : file.tensors) {
    const std::string key = strip_component(raw);
    if (key.find("_custom_diffusion") == std::string::npos) {
      report.unmatched.push_back(raw);
      continue;
    }
    std::string name = key;
    if (!options.prefix.empty()) {
      if (!starts_with(key, options.prefix + ".")) {
        report.outside_prefix.push_back(raw);
        continue;
      }
      name = key.substr(options.prefix.size() + 1);
    }
    const Variable p = model.find_parameter(name);
    if (!p.defined()) {
      report.unmatched.push_back(raw);
      continue;
    }
    if (p.shape() != tensor.shape()) {
      report.shape_mismatches.push_back({raw, p.shape(), tensor.shape()});
      continue;
    }
    if (!all_finite(tensor)) report.non_finite.push_back(raw);
    report.matched.push_back(raw);
    assign.emplace_back(p, tensor);
  }
  if (assign.empty()) strict_fail(path, "no Custom Diffusion key matches the model");
  if (options.strict) check_strict(report, path);
  NoGradGuard no_grad;
  for (auto& [p, t] : assign) p.tensor().copy_(t);  // same Variables: optimizers keep working
  return report;
}

void save_custom_diffusion(const nn::Module& model, const std::string& path, const std::string& prefix) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& [name, p] : model.named_parameters()) {
    if (name.find("_custom_diffusion") == std::string::npos) continue;
    LOOM_CHECK(all_finite(p.tensor()), "save_custom_diffusion: '", name, "' holds NaN or Inf; refusing to write ", path);
    tensors.emplace_back(join_path(prefix, name), p.tensor().to(Device::cpu()).contiguous());
  }
  LOOM_CHECK(!tensors.empty(), "save_custom_diffusion: the model has no Custom Diffusion parameters");
  if (ends_with(path, ".h5") || ends_with(path, ".hdf5")) {
    write_hdf5(path, tensors, {{"format", std::string("loom")}, {"format_version", int64_t(1)},
                               {"kind", std::string("custom_diffusion")}, {"prefix", prefix}});
  } else {
    write_safetensors(path, tensors, {{"format", "pt"}});
  }
}

// ---- models ----------------------------------------------------------------------------------------

namespace {
bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
}  // namespace

std::shared_ptr<attention::Transformer2DModel> load_model_dir(const std::string& dir, const std::string& prefix,
                                                              DType dtype) {
  const std::string config_path = dir + "/config.json";
  if (!file_exists(config_path)) throw FileError(config_path, "missing (a model directory holds config.json and weights)");
  attention::Transformer2DConfig config;
  try {
    config = attention::Transformer2DConfig::from_file(config_path);
  } catch (const FileError&) {
    throw;
  } catch (const Error& e) {
    throw FileError(config_path, e.what());
  }
  std::string weights;
  for (const char* name : {"model.safetensors", "diffusion_pytorch_model.safetensors", "model.h5"})
    if (weights.empty() && file_exists(dir + "/" + name)) weights = dir + "/" + name;
  if (weights.empty())
    throw FileError(dir, "no weights (expected model.safetensors, diffusion_pytorch_model.safetensors or model.h5)");
  const TensorFile file = read_tensor_file(weights);
  std::map<std::string, Tensor> state;
  for (const auto& [key, t] : file.tensors) {
    if (prefix.empty()) {
      state[key] = t;
    } else if (starts_with(key, prefix + ".")) {
      state[key.substr(prefix.size() + 1)] = t;
    }
  }
  if (state.empty()) throw FileError(weights, "no key under the prefix '" + prefix + "'");
  Generator gen(0);
  auto model = std::make_shared<attention::Transformer2DModel>(config, gen, dtype);
  try {
    model->load_state_dict(state, /*strict=*/true);
  } catch (const Error& e) {
    throw FileError(weights, std::string(e.what()) + (prefix.empty() ? "" : " (prefix '" + prefix + "')"));
  }
  for (const auto& [key, t] : state)
    if (!all_finite(t)) throw FileError(weights, "key '" + key + "' holds NaN or Inf values");
  return model;
}

std::string base_fingerprint(const nn::Module& model, const std::vector<std::string>& module_paths) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the f32 values
  auto mix = [&](const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  for (const std::string& path : module_paths) {
    const Variable w = model.find_parameter(path + ".weight");
    if (!w.defined()) continue;
    mix(path.data(), path.size());
    const Tensor t = w.tensor().to(Device::cpu()).to(DType::F32).contiguous();
    mix(t.raw_data(), size_t(t.numel()) * 4);
  }
  std::ostringstream os;
  os << std::hex << h;
  return os.str();
}

}  // namespace loom::io
