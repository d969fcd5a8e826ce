#include "unet/vae_config.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "unet/embeddings.h"

namespace loom::unet {
namespace {

using nlohmann::json;

bool present(const json& j, const std::string& key) { return j.contains(key) && !j.at(key).is_null(); }

int64_t integer(const json& j, const std::string& key, const std::string& source) {
  const json& v = j.at(key);
  LOOM_CHECK(v.is_number_integer(), source, ": key '", key, "' must be an integer, got ", v.dump());
  return v.get<int64_t>();
}
double number(const json& j, const std::string& key, const std::string& source) {
  const json& v = j.at(key);
  LOOM_CHECK(v.is_number(), source, ": key '", key, "' must be a number, got ", v.dump());
  return v.get<double>();
}
bool boolean(const json& j, const std::string& key, const std::string& source) {
  const json& v = j.at(key);
  LOOM_CHECK(v.is_boolean(), source, ": key '", key, "' must be true or false, got ", v.dump());
  return v.get<bool>();
}
std::vector<std::string> strings(const json& j, const std::string& key, const std::string& source) {
  const json& v = j.at(key);
  LOOM_CHECK(v.is_array() && !v.empty(), source, ": key '", key, "' must be a non-empty list of block type names");
  std::vector<std::string> out;
  for (const json& e : v) {
    LOOM_CHECK(e.is_string(), source, ": key '", key, "' holds ", e.dump(), ", not a block type name");
    out.push_back(e.get<std::string>());
  }
  return out;
}

}  // namespace

AutoencoderKLConfig AutoencoderKLConfig::from_json_text(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    LOOM_FAIL(source, ": not valid JSON (", e.what(), ")");
  }
  LOOM_CHECK(j.is_object(), source, ": expected a JSON object, got ", j.type_name());
  if (j.contains("_class_name") && j.at("_class_name").is_string())
    LOOM_CHECK(j.at("_class_name") == "AutoencoderKL", source, ": _class_name is ", j.at("_class_name").dump(),
               ", not AutoencoderKL (the only VAE loom implements)");
  AutoencoderKLConfig c;
  auto opt_int = [&](const char* key, int64_t& f) { if (present(j, key)) f = integer(j, key, source); };
  auto opt_bool = [&](const char* key, bool& f) { if (present(j, key)) f = boolean(j, key, source); };
  opt_int("in_channels", c.in_channels);
  opt_int("out_channels", c.out_channels);
  if (present(j, "down_block_types")) c.down_block_types = strings(j, "down_block_types", source);
  if (present(j, "up_block_types")) c.up_block_types = strings(j, "up_block_types", source);
  if (present(j, "block_out_channels")) {
    const json& v = j.at("block_out_channels");
    LOOM_CHECK(v.is_array() && !v.empty(), source, ": key 'block_out_channels' must be a non-empty list of integers");
    c.block_out_channels.clear();
    for (const json& e : v) {
      LOOM_CHECK(e.is_number_integer() && e.get<int64_t>() > 0, source, ": key 'block_out_channels' holds ", e.dump(),
                 ", not a positive integer");
      c.block_out_channels.push_back(e.get<int64_t>());
    }
  }
  opt_int("layers_per_block", c.layers_per_block);
  if (present(j, "act_fn")) {
    LOOM_CHECK(j.at("act_fn").is_string(), source, ": key 'act_fn' must be a string, got ", j.at("act_fn").dump());
    c.act_fn = j.at("act_fn").get<std::string>();
  }
  opt_int("latent_channels", c.latent_channels);
  LOOM_CHECK(!j.contains("norm_num_groups") || !j.at("norm_num_groups").is_null(), source,
             ": norm_num_groups = null is not supported");
  opt_int("norm_num_groups", c.norm_num_groups);
  if (present(j, "scaling_factor")) c.scaling_factor = number(j, "scaling_factor", source);
  if (present(j, "shift_factor")) c.shift_factor = number(j, "shift_factor", source), c.has_shift_factor = true;
  opt_bool("force_upcast", c.force_upcast);
  opt_bool("use_quant_conv", c.use_quant_conv);
  opt_bool("use_post_quant_conv", c.use_post_quant_conv);
  opt_bool("mid_block_add_attention", c.mid_block_add_attention);
  if (present(j, "sample_size"))
    LOOM_CHECK(j.at("sample_size").is_number_integer() || j.at("sample_size").is_array(), source,
               ": key 'sample_size' must be an integer or a list, got ", j.at("sample_size").dump());

  // ---- checks: named errors ----
  for (const char* key : {"latents_mean", "latents_std"})
    LOOM_CHECK(!present(j, key), source, ": ", key, " = ", j.at(key).dump(),
               " is not supported (loom scales latents by scaling_factor and shift_factor only; ", key, " must be null)");
  const size_t nb = c.block_out_channels.size();
  LOOM_CHECK(c.down_block_types.size() == nb && c.up_block_types.size() == nb, source, ": down_block_types (",
             c.down_block_types.size(), ") and up_block_types (", c.up_block_types.size(),
             ") must have one entry per block_out_channels entry (", nb, ")");
  for (const std::string& t : c.down_block_types)
    LOOM_CHECK(t == "DownEncoderBlock2D", source, ": down_block_types entry \"", t,
               "\" is not supported (DownEncoderBlock2D)");
  for (const std::string& t : c.up_block_types)
    LOOM_CHECK(t == "UpDecoderBlock2D", source, ": up_block_types entry \"", t, "\" is not supported (UpDecoderBlock2D)");
  LOOM_CHECK(nb <= 16, source, ": block_out_channels has ", nb, " entries (at most 16)");
  LOOM_CHECK(c.in_channels > 0 && c.out_channels > 0 && c.latent_channels > 0, source,
             ": in_channels, out_channels and latent_channels must be positive");
  LOOM_CHECK(c.layers_per_block > 0, source, ": layers_per_block must be positive, got ", c.layers_per_block);
  LOOM_CHECK(c.norm_num_groups > 0, source, ": norm_num_groups must be positive, got ", c.norm_num_groups);
  for (int64_t ch : c.block_out_channels)
    LOOM_CHECK(ch % c.norm_num_groups == 0, source, ": block_out_channels entry ", ch,
               " is not divisible by norm_num_groups ", c.norm_num_groups);
  try {
    check_activation(c.act_fn, "act_fn");
  } catch (const Error& e) {
    LOOM_FAIL(source, ": ", e.what());
  }
  LOOM_CHECK(c.scaling_factor != 0.0 && std::isfinite(c.scaling_factor), source, ": scaling_factor must be a non-zero number, got ",
             c.scaling_factor);

  static const std::set<std::string> known = {
      "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
      "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
      "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"};
  for (const auto& [key, value] : j.items())
    if (!known.count(key) && key.rfind("_", 0) != 0)
      c.notes.push_back(source + ": ignoring unknown key '" + key + "' (" + value.dump() + ")");
  return c;
}

AutoencoderKLConfig AutoencoderKLConfig::from_file(const std::string& path) {
  std::ifstream in(path);
  LOOM_CHECK(in.good(), path, ": cannot open the config file");
  std::stringstream ss;
  ss << in.rdbuf();
  return from_json_text(ss.str(), path);
}

}  // namespace loom::unet
