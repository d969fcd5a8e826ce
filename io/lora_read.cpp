// Reading LoRA files: against a model (parse_lora, load_lora) and without one (read_raw_lora).
#include <cmath>
#include <sstream>

#include "io/adapter_detail.h"

namespace loom::io {

using adapters::LoraModule;
using namespace detail;

namespace {

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
  return LoraKey{it == kohya_names.end() ? "" : it->second, split->second, KeyFamily::Kohya};
}
}  // namespace

LoraWeights parse_lora(const TensorFile& file, const std::string& path, const nn::Module& model,
                       const AdapterLoadOptions& options) {
  LoraWeights out;
  AdapterLoadReport& report = out.report;
  report.file = path;
  report.notes = file.notes;  // e.g. an HDF5 file without checksums
  const auto linears = model_linears(model);
  std::map<std::string, std::string> kohya_names;  // lora_unet_<full path> -> model path
  for (const auto& [p, l] : linears) kohya_names["lora_unet_" + underscored(join_path(options.prefix, p))] = p;
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
    if (!linears.count(module)) {
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
    resolve_alpha(file, path, peft, join_path(options.prefix, module), p.alpha, m.alpha, m.use_rslora);
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
      (k->role == Role::Down ? p.down : p.up) = tensor, (k->role == Role::Down ? p.down_key : p.up_key) = key;
  }
  for (auto& [module, p] : pieces) {
    if (!p.down.defined() || !p.up.defined()) {
      for (const std::string* k : {&p.down_key, &p.up_key})
        if (!k->empty()) raw.skipped.push_back(*k);
      continue;
    }
    RawLoraModule m{p.down, p.up, std::nullopt, false};
    resolve_alpha(file, path, peft, module, p.alpha, m.alpha, m.use_rslora);
    raw.modules[module] = m;
  }
  return raw;
}

}  // namespace loom::io
