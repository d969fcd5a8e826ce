// config.json of diffusers' UNet2DConditionModel, read as diffusers reads it.
//
// Per-block fields (num_attention_heads / attention_head_dim, cross_attention_dim,
// layers_per_block, transformer_layers_per_block, only_cross_attention) may be a
// scalar (the same for every block) or a list with one entry per down block; after
// parsing they are always lists. The head count of each CrossAttn block is
// num_attention_heads when given, else attention_head_dim (diffusers' legacy
// reading: in SD 1.x/2.x/SDXL configs, "attention_head_dim" holds head counts).
// transformer_layers_per_block entries may themselves be lists (one per layer,
// asymmetrical UNets), which then needs reverse_transformer_layers_per_block.
//
// Values loom does not implement (class embeddings, encoder_hid_proj, other block
// types, gligen, ...) are errors naming the key; unknown keys are kept as notes.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace loom::unet {

struct UNet2DConditionConfig {
  int64_t in_channels = 4, out_channels = 4;
  std::optional<int64_t> sample_size;
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  double freq_shift = 0;
  std::vector<std::string> down_block_types, up_block_types;
  std::string mid_block_type = "UNetMidBlock2DCrossAttn";  // "" = no mid block (null in the JSON)
  std::vector<bool> only_cross_attention;
  std::vector<int64_t> block_out_channels;
  std::vector<int64_t> layers_per_block;
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1.0;
  double dropout = 0.0;
  std::string act_fn = "silu";
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  std::vector<int64_t> cross_attention_dim;
  std::vector<std::vector<int64_t>> transformer_layers_per_block;          // [block][layer], or [block][0] for all layers
  std::vector<std::vector<int64_t>> reverse_transformer_layers_per_block;  // [up block][layer]; derived if absent
  std::vector<int64_t> num_attention_heads;  // resolved head count per down block
  bool use_linear_projection = false;
  bool upcast_attention = false;
  std::string resnet_time_scale_shift = "default";
  std::optional<int64_t> time_embedding_dim;
  std::string time_embedding_act_fn;  // "" = none
  int64_t conv_in_kernel = 3, conv_out_kernel = 3;
  std::string addition_embed_type;  // "" or "text_time"
  int64_t addition_time_embed_dim = 0;
  int64_t projection_class_embeddings_input_dim = 0;
  std::vector<std::string> notes;  // ignored keys, one note each

  int64_t time_embed_dim() const { return time_embedding_dim.value_or(block_out_channels.at(0) * 4); }
  // SDXL: the width of text_embeds (projection_class_embeddings_input_dim − 6·addition_time_embed_dim).
  int64_t text_embeds_dim(int64_t num_time_ids = 6) const {
    return projection_class_embeddings_input_dim - num_time_ids * addition_time_embed_dim;
  }

  static UNet2DConditionConfig from_json_text(const std::string& text, const std::string& source = "config.json");
  static UNet2DConditionConfig from_file(const std::string& path);
};

}  // namespace loom::unet
