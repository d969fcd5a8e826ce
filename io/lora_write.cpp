// Writing LoRA files in every family (safetensors: PEFT, diffusers, kohya; HDF5: loom).
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "io/adapter_detail.h"
#include "tensor/ops.h"

namespace loom::io {

using adapters::LoraAdapter;
using nlohmann::json;
using namespace detail;

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
  bool dora = false;
  for (const auto& [path, m] : lora.modules) dora = dora || m.magnitude.defined();
  if (dora) j["unet.use_dora"] = true;
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
    if (!m.plain()) {  // LoHa / LoKr / DoRA: the tensors as they were read (shapes of the file)
      auto plain_host = [](const Variable& v) { return v.defined() ? v.tensor().to(Device::cpu()).contiguous() : Tensor(); };
      RawLoraModule r{plain_host(m.down), plain_host(m.up), m.alpha, m.use_rslora};
      r.kind = m.kind;
      for (const auto& [name, v] : m.factors) r.factors[name] = plain_host(v);
      r.magnitude = plain_host(m.magnitude);
      r.magnitude_name = m.magnitude_name;
      raw.modules[join_path(prefix, path)] = r;
      continue;
    }
    raw.modules[join_path(prefix, path)] = RawLoraModule{host(m.down), host(m.up), m.alpha, m.use_rslora};
  }
  return raw;
}

}  // namespace

void detail::write_raw_lora(const std::string& path, const RawLora& lora, KeyFamily family, Attributes root,
                            const WriteOptions& options) {
  check_writable(lora, path);
  std::map<std::string, std::string> metadata;
  const auto tensors = raw_lora_tensors(lora, family, &metadata, options);
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

namespace {

// The up blocks of `lora` that have an upsampler but no attention (SD 1.x up_blocks.0): their
// upsampler is sub-index 1 of the SGM numbering.
std::set<int> up_blocks_without_attention(const RawLora& lora) {
  std::set<int> with_upsampler, with_attention;
  for (const auto& [path, m] : lora.modules) {
    int b = 0;
    char kind[32] = {};
    if (std::sscanf(path.c_str(), "up_blocks.%d.%31[a-z]", &b, kind) != 2) continue;
    if (std::string(kind) == "upsamplers") with_upsampler.insert(b);
    if (std::string(kind) == "attentions") with_attention.insert(b);
  }
  std::set<int> out;
  for (int b : with_upsampler)
    if (!with_attention.count(b)) out.insert(b);
  return out;
}

// kohya's module name of a UNet path (SGM numbering on request, where the path has one).
std::string kohya_name(const std::string& full, const WriteOptions& options, const std::set<int>& no_attention) {
  if (options.sgm_names) {
    const std::string sgm = path_to_sgm(full, no_attention);
    if (!sgm.empty()) return "lora_unet_" + underscored(sgm);
  }
  return "lora_unet_" + underscored(full);
}

// kohya's module name of a text-encoder path ("text_encoder.text_model.….q_proj"): lora_te_ in a
// file with one text encoder, lora_te1_ / lora_te2_ with two (SDXL).
std::string kohya_text_encoder_name(const std::string& full, bool two_encoders) {
  const bool second = starts_with(full, "text_encoder_2.");
  const std::string rest = full.substr(full.find('.') + 1);
  return (second ? "lora_te2_" : two_encoders ? "lora_te1_" : "lora_te_") + underscored(rest);
}

// up · factor, computed in f64 and stored in the up weights' dtype.
Tensor folded_up(const RawLoraModule& m, double factor) {
  return ops::mul_scalar(m.up.to(DType::F64), factor).to(m.up.dtype());
}

// Throws unless `family` can hold `m` exactly: LoHa / LoKr only in kohya (LyCORIS) names; a DoRA
// magnitude in kohya (dora_scale) or, when it is PEFT's (one per output row, no eps), in PEFT.
void check_representable(const std::string& module, const RawLoraModule& m, KeyFamily family) {
  if (m.kind != adapters::ModuleKind::LoRA)
    LOOM_CHECK(family == KeyFamily::Kohya, "LoRA writer: module '", module, "' is a ", m.kind_text(),
               " (LyCORIS), which the ", family_name(family),
               " format cannot hold; write it with --to kohya (LyCORIS' key names)");
  if (m.magnitude.defined() && family != KeyFamily::Kohya)
    LOOM_CHECK(family == KeyFamily::Peft && m.magnitude_name == "lora_magnitude_vector", "LoRA writer: module '",
               module, "' carries a DoRA magnitude (", m.magnitude_name, "), which the ", family_name(family),
               " format cannot hold",
               m.magnitude_name == "lora_magnitude_vector" ? "; write it with --to peft or --to kohya"
                                                           : " (LyCORIS' norm convention); write it with --to kohya");
}

// The DoRA magnitude in LyCORIS' dora_scale spelling. A LyCORIS one is written as read; PEFT's
// (one per output row, no eps in the norm) becomes (out, 1, …) in f64, whose machine epsilon
// (2.2e-16, the eps LyCORIS adds to the norm) changes nothing within rounding.
Tensor kohya_dora_scale(const RawLoraModule& m) {
  if (m.magnitude_name == "dora_scale") return m.magnitude;
  const int64_t out = m.magnitude.numel();
  const Tensor& ref = m.kind == adapters::ModuleKind::LoRA ? m.down : m.factors.begin()->second;
  Shape s{out, 1};
  for (int64_t d = 2; d < ref.dim(); ++d) s.push_back(1);
  return m.magnitude.to(DType::F64).reshape(s);
}

// The alpha (alpha / r = scale) most modules of `lora` have.
double most_common_alpha(const RawLora& lora) {
  std::map<double, size_t> count;
  for (const auto& [path, m] : lora.modules)
    if (m.kind == adapters::ModuleKind::LoRA) ++count[m.scale() * double(m.rank())];
  double best = 0;
  size_t most = 0;
  for (const auto& [a, n] : count)
    if (n > most) best = a, most = n;
  return best;
}

}  // namespace

std::vector<std::pair<std::string, Tensor>> raw_lora_tensors(const RawLora& lora, KeyFamily family,
                                                             std::map<std::string, std::string>* metadata,
                                                             const WriteOptions& options) {
  LOOM_CHECK(!lora.modules.empty(), "LoRA writer: no modules to write");
  LOOM_CHECK(!options.sgm_names || family == KeyFamily::Kohya, "LoRA writer: SGM block names are a kohya spelling, not ",
             family_name(family));
  const std::set<int> no_attention = up_blocks_without_attention(lora);
  // kohya files hold one alpha per module, but diffusers' kohya loader drops per-module alphas
  // of attention layers (it names them by its legacy processor keys, which match no module) and
  // applies the most common one: so every module is written with the most common alpha, and a
  // module whose own alpha differs has the ratio folded into its up weights (same ΔW for every
  // reader: loom, sd-scripts, diffusers).
  const double common_alpha = most_common_alpha(lora);
  bool two_encoders = false;
  for (const auto& [full, m] : lora.modules) two_encoders = two_encoders || starts_with(full, "text_encoder_2.");
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& [full, m] : lora.modules) {
    check_representable(full, m, family);
    const std::string kohya_module = is_text_encoder_path(full) ? kohya_text_encoder_name(full, two_encoders)
                                                                : kohya_name(full, options, no_attention);
    if (m.kind != adapters::ModuleKind::LoRA) {  // LoHa / LoKr: LyCORIS' own keys, its own alpha (kohya only)
      for (const auto& [name, t] : m.factors) out.emplace_back(kohya_module + "." + name, t);
      if (m.alpha) out.emplace_back(kohya_module + ".alpha", Tensor::scalar(*m.alpha, DType::F32));
      if (m.magnitude.defined()) out.emplace_back(kohya_module + ".dora_scale", kohya_dora_scale(m));
      continue;
    }
    if (m.magnitude.defined() && family == KeyFamily::Kohya)
      out.emplace_back(kohya_module + ".dora_scale", kohya_dora_scale(m));
    if (m.magnitude.defined() && family == KeyFamily::Peft)
      out.emplace_back((is_text_encoder_path(full) ? full : "unet." + full) + ".lora_magnitude_vector", m.magnitude);
    // alpha such that alpha / r is the module's scale: the kohya and diffusers convention
    const double own_alpha = m.scale() * double(m.rank());
    const bool fold_alpha = own_alpha != common_alpha && common_alpha != 0;
    const Tensor alpha = Tensor::scalar(fold_alpha ? common_alpha : own_alpha, DType::F32);
    // UNet keys carry "unet." (diffusers, PEFT); text-encoder paths already name their component.
    const std::string component = is_text_encoder_path(full) ? full : "unet." + full;
    const std::string& kohya = kohya_module;
    switch (family) {
      case KeyFamily::Peft:
        out.emplace_back(component + ".lora_A.weight", m.down);
        out.emplace_back(component + ".lora_B.weight", m.up);
        break;
      case KeyFamily::Loom:
        out.emplace_back(full + ".lora_A.weight", m.down);
        out.emplace_back(full + ".lora_B.weight", m.up);
        break;
      case KeyFamily::Diffusers:
        // What diffusers' load_lora_weights accepts: no `.alpha` keys (it rejects them), so the
        // scale is folded into the up weights and diffusers' default scale 1 reproduces ours.
        out.emplace_back(component + ".lora.down.weight", m.down);
        out.emplace_back(component + ".lora.up.weight", m.scale() == 1.0 ? m.up : folded_up(m, m.scale()));
        break;
      case KeyFamily::Kohya:
        out.emplace_back(kohya + ".lora_down.weight", m.down);
        out.emplace_back(kohya + ".lora_up.weight", fold_alpha ? folded_up(m, own_alpha / common_alpha) : m.up);
        out.emplace_back(kohya + ".alpha", alpha);
        break;
      default:
        LOOM_FAIL("LoRA writer: cannot write LoRA weights as ", family_name(family));
    }
  }
  if (metadata) {
    (*metadata)["format"] = "pt";
    if (family == KeyFamily::Peft) (*metadata)["lora_adapter_metadata"] = peft_metadata(lora);
    bool lycoris = false;
    for (const auto& [full, m] : lora.modules) lycoris = lycoris || !m.plain();
    if (family == KeyFamily::Kohya && lycoris) (*metadata)["ss_network_module"] = "lycoris.kohya";
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

}  // namespace loom::io
