// Alpha resolution: where a LoRA module's alpha and scaling convention come from (loom's
// group attributes, kohya/diffusers `.alpha` keys, PEFT's lora_adapter_metadata).
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/adapter_detail.h"

namespace loom::io::detail {

using nlohmann::json;

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
  // r and lora_alpha must be numbers when present (null is what a NaN becomes in JSON).
  auto get = [&](const std::string& k) -> const json* {
    for (const std::string& p : {std::string("unet."), std::string("")}) {
      if (!j.contains(p + k)) continue;
      if (!j.at(p + k).is_null()) return &j.at(p + k);
      if (k == "r" || k == "lora_alpha")
        throw FileError(path, "lora_adapter_metadata: '" + p + k + "' is null (not a number)");
    }
    return nullptr;
  };
  auto number = [&](const json& v, const std::string& where) {
    if (v.is_null()) throw FileError(path, "lora_adapter_metadata: " + where + " is null (not a number)");
    return v.get<double>();
  };
  try {
    if (const json* v = get("r")) c.r = v->get<int64_t>();
    if (const json* v = get("lora_alpha")) c.lora_alpha = v->get<double>();
    if (const json* v = get("use_rslora")) c.use_rslora = v->get<bool>();
    if (const json* v = get("rank_pattern"))
      for (const auto& [k, r] : v->items()) c.rank_pattern[k] = int64_t(number(r, "rank_pattern['" + k + "']"));
    if (const json* v = get("alpha_pattern"))
      for (const auto& [k, a] : v->items()) c.alpha_pattern[k] = number(a, "alpha_pattern['" + k + "']");
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
void resolve_alpha(const TensorFile& file, const std::string& path, const PeftConfig& peft, const std::string& full,
                   const std::optional<double>& key_alpha, std::optional<double>& alpha, bool& use_rslora) {
  alpha.reset();
  use_rslora = false;
  const char* source = "the group attribute 'alpha'";
  if (is_loom_file(file) && file.group_attributes.count(full)) {
    const Attributes& a = file.group_attributes.at(full);
    if (a.count("alpha") && std::get_if<double>(&a.at("alpha"))) alpha = std::get<double>(a.at("alpha"));
    if (a.count("scaling") && std::get_if<std::string>(&a.at("scaling")))
      use_rslora = std::get<std::string>(a.at("scaling")) == "alpha/sqrt(r)";
  }
  if (!alpha) alpha = key_alpha, source = "its .alpha key";
  if (!alpha && peft.present) {
    alpha = pattern_value(peft.alpha_pattern, full);
    if (!alpha) alpha = peft.lora_alpha;
    use_rslora = peft.use_rslora;
    source = "lora_adapter_metadata";
  }
  if (alpha && !std::isfinite(*alpha))
    throw FileError(path, "the alpha of module '" + full + "' (from " + source + ") is " +
                              (std::isnan(*alpha) ? "NaN" : "infinite") + "; an alpha must be a finite number");
}

double alpha_value(const Tensor& t, const std::string& path, const std::string& key) {
  std::ostringstream shape;
  shape << t.shape();
  if (t.numel() != 1 || t.dim() > 1)
    throw FileError(path, "key '" + key + "' (a LoRA alpha) has shape " + shape.str() + " with " +
                              std::to_string(t.numel()) + " values; an alpha is one number (a 0-d tensor)");
  const double v = t.item();
  if (!std::isfinite(v))
    throw FileError(path, "key '" + key + "' (a LoRA alpha) is " + (std::isnan(v) ? "NaN" : "infinite") +
                              "; an alpha must be a finite number");
  return v;
}

void check_writable(const RawLora& lora, const std::string& out) {
  for (const auto& [module, m] : lora.modules) {
    LOOM_CHECK(!m.alpha || std::isfinite(*m.alpha), "LoRA writer: module '", module,
               "' has a non-finite alpha; refusing to write ", out);
    LOOM_CHECK(std::isfinite(m.scale()), "LoRA writer: module '", module, "' has a non-finite scale; refusing to write ", out);
    for (const Tensor* t : m.tensors())
      LOOM_CHECK(all_finite(*t), "LoRA writer: module '", module, "' holds NaN or Inf; refusing to write ", out);
  }
}


}  // namespace loom::io::detail
