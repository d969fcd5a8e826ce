#include "unet/config.h"

#include <set>

#include "io/config_json.h"

namespace loom::unet {
namespace {

using io::config_json::json;
using io::config_json::Reader;

void expect_value(const Reader& r, const std::string& key, const json& supported, const std::string& what) {
  if (!r.j.contains(key)) return;
  const json& v = r.j.at(key);
  LOOM_CHECK(v == supported || (v.is_null() && supported.is_null()), r.source, ": ", key, " = ", v.dump(),
             " is not supported (loom implements ", what, ")");
}

}  // namespace

UNet2DConditionConfig UNet2DConditionConfig::from_json_text(const std::string& text, const std::string& source) {
  const json j = io::config_json::parse_object(text, source);
  io::config_json::check_class_name(j, "UNet2DConditionModel", source);
  const Reader r{j, source};
  UNet2DConditionConfig c;
  r.opt("in_channels", c.in_channels);
  r.opt("out_channels", c.out_channels);
  if (r.has("sample_size") && j.at("sample_size").is_number_integer()) c.sample_size = j.at("sample_size").get<int64_t>();
  r.opt("center_input_sample", c.center_input_sample);
  r.opt("flip_sin_to_cos", c.flip_sin_to_cos);
  r.opt("freq_shift", c.freq_shift);
  c.down_block_types = r.has("down_block_types")
                           ? r.strings("down_block_types")
                           : std::vector<std::string>{"CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                      "CrossAttnDownBlock2D", "DownBlock2D"};
  c.up_block_types = r.has("up_block_types") ? r.strings("up_block_types")
                                             : std::vector<std::string>{"UpBlock2D", "CrossAttnUpBlock2D",
                                                                        "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"};
  for (auto* types : {&c.down_block_types, &c.up_block_types})
    for (std::string& t : *types)
      if (t.rfind("UNetRes", 0) == 0) t = t.substr(7);  // diffusers strips this prefix too
  if (j.contains("mid_block_type")) c.mid_block_type = j.at("mid_block_type").is_null() ? "" : r.string(j.at("mid_block_type"), "mid_block_type");
  LOOM_CHECK(c.mid_block_type.empty() || c.mid_block_type == "UNetMidBlock2DCrossAttn", source, ": mid_block_type \"",
             c.mid_block_type, "\" is not supported (UNetMidBlock2DCrossAttn or null)");
  const size_t nb = c.down_block_types.size();
  LOOM_CHECK(nb >= 1 && c.up_block_types.size() == nb, source, ": down_block_types (", nb, ") and up_block_types (",
             c.up_block_types.size(), ") must have the same, non-zero length");
  if (r.has("block_out_channels")) {
    c.block_out_channels = r.per_block<int64_t>("block_out_channels", nb, 0, [&](const json& v, const std::string& k) { return r.integer(v, k); });
  } else {
    c.block_out_channels = {320, 640, 1280, 1280};
    LOOM_CHECK(nb == 4, source, ": block_out_channels is missing (the default has 4 entries, there are ", nb, " blocks)");
  }
  auto int_reader = [&](const json& v, const std::string& k) { return r.integer(v, k); };
  auto bool_reader = [&](const json& v, const std::string& k) { return r.boolean(v, k); };
  c.only_cross_attention = r.per_block<bool>("only_cross_attention", nb, false, bool_reader);
  c.layers_per_block = r.per_block<int64_t>("layers_per_block", nb, 2, int_reader);
  r.opt("downsample_padding", c.downsample_padding);
  r.opt("mid_block_scale_factor", c.mid_block_scale_factor);
  r.opt("dropout", c.dropout);
  r.opt("act_fn", c.act_fn);
  LOOM_CHECK(!j.contains("norm_num_groups") || !j.at("norm_num_groups").is_null(), source,
             ": norm_num_groups = null is not supported");
  r.opt("norm_num_groups", c.norm_num_groups);
  r.opt("norm_eps", c.norm_eps);
  c.cross_attention_dim = r.per_block<int64_t>("cross_attention_dim", nb, 1280, int_reader);
  // transformer_layers_per_block: int, list of ints, or list of lists (asymmetrical)
  auto layers_reader = [&](const json& v, const std::string& k) {
    if (!v.is_array()) return std::vector<int64_t>{r.integer(v, k)};
    std::vector<int64_t> out;
    for (const json& e : v) out.push_back(r.integer(e, k));
    return out;
  };
  const auto tl = r.per_block<std::vector<int64_t>>("transformer_layers_per_block", nb, {1}, layers_reader);
  const bool nested = r.has("transformer_layers_per_block") && j.at("transformer_layers_per_block").is_array() &&
                      std::any_of(j.at("transformer_layers_per_block").begin(), j.at("transformer_layers_per_block").end(),
                                  [](const json& e) { return e.is_array(); });
  if (r.has("reverse_transformer_layers_per_block")) {
    c.reverse_transformer_layers_per_block =
        r.per_block<std::vector<int64_t>>("reverse_transformer_layers_per_block", nb, {1}, layers_reader);
  } else {
    LOOM_CHECK(!nested, source, ": transformer_layers_per_block holds lists: reverse_transformer_layers_per_block is required (as in diffusers)");
  }
  // A one-entry list stands for a scalar: the block repeats it per layer (its own layer count).
  c.transformer_layers_per_block = tl;
  // Heads: num_attention_heads when given, else the legacy attention_head_dim (a head count).
  const std::string heads_key = r.has("num_attention_heads") ? "num_attention_heads" : "attention_head_dim";
  c.num_attention_heads = r.per_block<int64_t>(heads_key, nb, 8, int_reader);
  r.opt("use_linear_projection", c.use_linear_projection);
  r.opt("upcast_attention", c.upcast_attention);
  r.opt("resnet_time_scale_shift", c.resnet_time_scale_shift);
  if (r.has("time_embedding_dim")) c.time_embedding_dim = r.integer(j.at("time_embedding_dim"), "time_embedding_dim");
  r.opt("time_embedding_act_fn", c.time_embedding_act_fn);
  r.opt("conv_in_kernel", c.conv_in_kernel);
  r.opt("conv_out_kernel", c.conv_out_kernel);
  r.opt("addition_embed_type", c.addition_embed_type);
  r.opt("addition_time_embed_dim", c.addition_time_embed_dim);
  r.opt("projection_class_embeddings_input_dim", c.projection_class_embeddings_input_dim);

  // ---- values loom does not implement: named errors ----
  expect_value(r, "dual_cross_attention", false, "dual_cross_attention = false");
  expect_value(r, "class_embed_type", nullptr, "no class embedding");
  expect_value(r, "num_class_embeds", nullptr, "no class embedding");
  expect_value(r, "class_embeddings_concat", false, "class_embeddings_concat = false");
  expect_value(r, "encoder_hid_dim", nullptr, "no encoder_hid_proj");
  expect_value(r, "encoder_hid_dim_type", nullptr, "no encoder_hid_proj");
  expect_value(r, "time_embedding_type", "positional", "positional time embeddings");
  expect_value(r, "timestep_post_act", nullptr, "no timestep_post_act");
  expect_value(r, "time_cond_proj_dim", nullptr, "no time_cond_proj_dim");
  expect_value(r, "attention_type", "default", "attention_type \"default\"");
  expect_value(r, "resnet_skip_time_act", false, "resnet_skip_time_act = false");
  expect_value(r, "resnet_out_scale_factor", 1.0, "resnet_out_scale_factor = 1");
  LOOM_CHECK(c.addition_embed_type.empty() || c.addition_embed_type == "text_time", source, ": addition_embed_type \"",
             c.addition_embed_type, "\" is not supported (null or text_time)");
  if (c.addition_embed_type == "text_time")
    LOOM_CHECK(c.addition_time_embed_dim > 0 && c.projection_class_embeddings_input_dim > 6 * c.addition_time_embed_dim,
               source, ": addition_embed_type text_time needs addition_time_embed_dim and projection_class_embeddings_input_dim > 6·addition_time_embed_dim");
  LOOM_CHECK(c.resnet_time_scale_shift == "default" || c.resnet_time_scale_shift == "scale_shift", source,
             ": resnet_time_scale_shift \"", c.resnet_time_scale_shift, "\" is not supported (default, scale_shift)");
  LOOM_CHECK(c.conv_in_kernel % 2 == 1 && c.conv_out_kernel % 2 == 1, source, ": conv_in_kernel and conv_out_kernel must be odd");
  for (const std::string& t : c.down_block_types)
    LOOM_CHECK(t == "DownBlock2D" || t == "CrossAttnDownBlock2D", source, ": down block type \"", t,
               "\" is not supported (DownBlock2D, CrossAttnDownBlock2D)");
  for (const std::string& t : c.up_block_types)
    LOOM_CHECK(t == "UpBlock2D" || t == "CrossAttnUpBlock2D", source, ": up block type \"", t,
               "\" is not supported (UpBlock2D, CrossAttnUpBlock2D)");
  for (int64_t ch : c.block_out_channels)
    LOOM_CHECK(ch > 0 && ch % c.norm_num_groups == 0, source, ": block_out_channels entry ", ch,
               " is not divisible by norm_num_groups ", c.norm_num_groups);

  static const std::set<std::string> known = {
      "in_channels", "out_channels", "sample_size", "center_input_sample", "flip_sin_to_cos", "freq_shift",
      "down_block_types", "up_block_types", "mid_block_type", "only_cross_attention", "block_out_channels",
      "layers_per_block", "downsample_padding", "mid_block_scale_factor", "dropout", "act_fn", "norm_num_groups",
      "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "reverse_transformer_layers_per_block",
      "attention_head_dim", "num_attention_heads", "use_linear_projection", "upcast_attention",
      "resnet_time_scale_shift", "time_embedding_dim", "time_embedding_act_fn", "conv_in_kernel", "conv_out_kernel",
      "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
      "dual_cross_attention", "class_embed_type", "num_class_embeds", "class_embeddings_concat", "encoder_hid_dim",
      "encoder_hid_dim_type", "time_embedding_type", "timestep_post_act", "time_cond_proj_dim", "attention_type",
      "resnet_skip_time_act", "resnet_out_scale_factor"};
  // Read by diffusers only for block types loom refuses anyway (Simple/KCrossAttn blocks, "text" embeddings).
  static const std::set<std::string> unused_here = {"mid_block_only_cross_attention", "cross_attention_norm",
                                                    "addition_embed_type_num_heads"};
  io::config_json::note_unknown_keys(j, known, unused_here, source, c.notes);
  return c;
}

UNet2DConditionConfig UNet2DConditionConfig::from_file(const std::string& path) {
  return from_json_text(io::config_json::read_text(path), path);
}

}  // namespace loom::unet
