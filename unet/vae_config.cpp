#include "unet/vae_config.h"

#include <cmath>
#include <set>

#include "io/config_json.h"
#include "unet/embeddings.h"

namespace loom::unet {

using io::config_json::json;

AutoencoderKLConfig AutoencoderKLConfig::from_json_text(const std::string& text, const std::string& source) {
  const json j = io::config_json::parse_object(text, source);
  io::config_json::check_class_name(j, "AutoencoderKL", source, " (the only VAE loom implements)");
  const io::config_json::Reader r{j, source};
  AutoencoderKLConfig c;
  r.opt("in_channels", c.in_channels);
  r.opt("out_channels", c.out_channels);
  if (r.has("down_block_types")) c.down_block_types = r.strings("down_block_types");
  if (r.has("up_block_types")) c.up_block_types = r.strings("up_block_types");
  if (r.has("block_out_channels")) {
    const json& v = j.at("block_out_channels");
    LOOM_CHECK(v.is_array() && !v.empty(), source, ": key 'block_out_channels' must be a non-empty list of integers");
    c.block_out_channels.clear();
    for (const json& e : v) {
      LOOM_CHECK(e.is_number_integer() && e.get<int64_t>() > 0, source, ": key 'block_out_channels' holds ", e.dump(),
                 ", not a positive integer");
      c.block_out_channels.push_back(e.get<int64_t>());
    }
  }
  r.opt("layers_per_block", c.layers_per_block);
  r.opt("act_fn", c.act_fn);
  r.opt("latent_channels", c.latent_channels);
  LOOM_CHECK(!j.contains("norm_num_groups") || !j.at("norm_num_groups").is_null(), source,
             ": norm_num_groups = null is not supported");
  r.opt("norm_num_groups", c.norm_num_groups);
  r.opt("scaling_factor", c.scaling_factor);
  if (r.has("shift_factor")) r.opt("shift_factor", c.shift_factor), c.has_shift_factor = true;
  r.opt("force_upcast", c.force_upcast);
  r.opt("use_quant_conv", c.use_quant_conv);
  r.opt("use_post_quant_conv", c.use_post_quant_conv);
  r.opt("mid_block_add_attention", c.mid_block_add_attention);
  if (r.has("sample_size"))
    LOOM_CHECK(j.at("sample_size").is_number_integer() || j.at("sample_size").is_array(), source,
               ": key 'sample_size' must be an integer or a list, got ", j.at("sample_size").dump());

  // ---- checks: named errors ----
  for (const char* key : {"latents_mean", "latents_std"})
    LOOM_CHECK(!r.has(key), source, ": ", key, " = ", j.at(key).dump(),
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
  io::config_json::note_unknown_keys(j, known, {}, source, c.notes);
  return c;
}

AutoencoderKLConfig AutoencoderKLConfig::from_file(const std::string& path) {
  return from_json_text(io::config_json::read_text(path), path);
}

}  // namespace loom::unet
