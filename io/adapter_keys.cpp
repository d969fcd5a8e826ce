// Key families of adapter files: names of the families, the diffusers / legacy / PEFT key
// parsers, kohya's flattened names split back into diffusers paths.
#include <algorithm>
#include <set>
#include <sstream>

#include "io/adapter_detail.h"

namespace loom::io {

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

namespace detail {

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
  // DoRA's magnitude as PEFT saves it (….lora_magnitude_vector), also with the parameter's own
  // ".weight" or an adapter name (….lora_magnitude_vector.default.weight).
  if (const size_t at = key.find(".lora_magnitude_vector"); at != std::string::npos) {
    const std::string rest = key.substr(at + 22);
    if (rest.empty() || rest == ".weight" || (starts_with(rest, ".") && ends_with(rest, ".weight") &&
                                              rest.find('.', 1) == rest.size() - 7))
      return LoraKey{key.substr(0, at), Role::Magnitude, KeyFamily::Peft, "lora_magnitude_vector"};
  }
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
  if (starts_with(key, "text_encoder")) {  // diffusers' text-encoder spellings: to_q_lora, lora_linear_layer
    static const std::vector<std::pair<std::string, std::string>> legacy = {
        {".to_q_lora.", ".q_proj"}, {".to_k_lora.", ".k_proj"}, {".to_v_lora.", ".v_proj"}, {".to_out_lora.", ".out_proj"},
        {".lora_linear_layer.", ""}};
    for (const auto& [spelled, proj] : legacy)
      for (const char* role : {"down.weight", "up.weight"})
        if (ends_with(key, spelled + role))
          return LoraKey{key.substr(0, key.size() - spelled.size() - std::string(role).size()) + proj,
                         role[0] == 'd' ? Role::Down : Role::Up, KeyFamily::DiffusersLegacy};
  }
  if (ends_with(key, ".lora.down.weight")) return LoraKey{cut(".lora.down.weight"), Role::Down, KeyFamily::Diffusers};
  if (ends_with(key, ".lora.up.weight")) return LoraKey{cut(".lora.up.weight"), Role::Up, KeyFamily::Diffusers};
  if (ends_with(key, ".alpha")) return LoraKey{cut(".alpha"), Role::Alpha, KeyFamily::Diffusers};
  return std::nullopt;
}

// Kohya names flatten dots to underscores; they are resolved against the model's paths.
std::optional<std::pair<std::string, Role>> split_kohya_key(const std::string& key) {
  const size_t dot = key.find('.');
  if (dot == std::string::npos) return std::nullopt;
  const std::string name = key.substr(0, dot), rest = key.substr(dot + 1);
  if (rest == "lora_down.weight") return std::make_pair(name, Role::Down);
  if (rest == "lora_up.weight") return std::make_pair(name, Role::Up);
  if (rest == "alpha") return std::make_pair(name, Role::Alpha);
  if (const auto role = lycoris_role(rest)) return std::make_pair(name, *role);
  return std::nullopt;
}

std::optional<Role> lycoris_role(const std::string& suffix) {
  static const std::set<std::string> factors = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
                                                "hada_t2",   "lokr_w1",   "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                "lokr_w2_a", "lokr_w2_b", "lokr_t1",   "lokr_t2"};
  if (factors.count(suffix)) return Role::Factor;
  if (suffix == "dora_scale") return Role::Magnitude;
  return std::nullopt;
}

bool is_text_encoder_key(const std::string& key) {
  return starts_with(key, "lora_te") || starts_with(key, "text_encoder");
}

// A 2-D LoRA matrix from a 2-D or (·, ·, 1, 1) tensor.
std::optional<Tensor> as_matrix(const Tensor& t) {
  if (t.dim() == 2) return t;
  if (t.dim() == 4 && t.size(2) == 1 && t.size(3) == 1) return t.reshape({t.size(0), t.size(1)});
  return std::nullopt;
}

}  // namespace detail

using namespace detail;

namespace {

// Splits a flattened name back into a dotted path: '_' is a dot except inside the words of
// `words` (module names that contain underscores).
std::string split_flattened(const std::string& flat, const std::vector<std::string>& words) {
  std::vector<std::string> tokens;
  std::stringstream ss(flat);
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

}  // namespace

std::string kohya_text_encoder_path(const std::string& kohya_name) {
  // CLIP text-model words that contain underscores.
  static const std::vector<std::string> words = {
      "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection", "final_layer_norm",
      "layer_norm1", "layer_norm2", "token_embedding", "position_embedding"};
  for (const auto& [head, component] : {std::pair<std::string, std::string>{"lora_te_", "text_encoder."},
                                        {"lora_te1_", "text_encoder."}, {"lora_te2_", "text_encoder_2."}})
    if (starts_with(kohya_name, head) && kohya_name.size() > head.size())
      return component + split_flattened(kohya_name.substr(head.size()), words);
  return "";
}

bool is_text_encoder_path(const std::string& path) { return starts_with(path, "text_encoder"); }

std::string kohya_to_path(const std::string& kohya_name) {
  if (!starts_with(kohya_name, "lora_unet_")) return "";
  // Words of diffusers UNet paths (and of the SGM/LDM numbering) that contain underscores.
  static const std::vector<std::string> words = {
      "transformer_blocks", "down_blocks", "up_blocks", "mid_block", "add_k_proj", "add_v_proj", "to_out",
      "proj_in", "proj_out", "to_q", "to_k", "to_v", "norm_cross", "group_norm", "time_emb_proj", "conv_shortcut",
      "time_embedding", "add_embedding", "linear_1", "linear_2", "conv_in", "conv_out", "conv_norm_out",
      "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
      "time_embed", "label_emb"};
  const std::string path = split_flattened(kohya_name.substr(10), words);
  return is_sgm_kohya_name(kohya_name) ? sgm_to_path(path) : path;
}

}  // namespace loom::io
