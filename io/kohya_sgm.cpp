// The original (SGM/LDM) block numbering of Stable Diffusion UNets, as kohya's sd-scripts
// writes it for SDXL (and some SD 1.x files), mapped to diffusers' block names and back.
//
// The LDM UNet numbers its blocks in one flat list per stage; with two layers per block
// (SD 1.x, 2.x and SDXL all have layers_per_block = 2) each down block holds three entries:
//   input_blocks.N (N ≥ 1): block b = (N−1)/3, slot l = (N−1)%3; slot 0/1 are the layers
//     (sub-index 0 = ResBlock = resnets.l, 1 = SpatialTransformer = attentions.l), slot 2 the
//     Downsample (`op` = downsamplers.0.conv); input_blocks.0.0 is conv_in.
//   middle_block.0 / .1 / .2 = mid_block.resnets.0 / attentions.0 / resnets.1.
//   output_blocks.N: block b = N/3, layer l = N%3; sub-index 0 = resnets.l, 1 = attentions.l
//     (or the Upsample's conv in an up block without attention, SD 1.x up_blocks.0),
//     2 = upsamplers.0.
// This is the arithmetic of diffusers' own loader (loaders/lora_conversion_utils.py), with the
// same ResBlock renames (in_layers.2 = conv1, out_layers.3 = conv2, emb_layers.1 =
// time_emb_proj, skip_connection = conv_shortcut) and the top-level modules added (time_embed,
// label_emb, out) so that both directions cover every Linear/Conv of the UNet.
#include <algorithm>
#include <map>
#include <sstream>
#include <vector>

#include "io/adapter_detail.h"

namespace loom::io {

using namespace detail;

namespace {

constexpr int kSlots = 3;  // layers_per_block + 1

std::vector<std::string> split_dots(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string t; std::getline(ss, t, '.');) out.push_back(t);
  return out;
}

std::string join_from(const std::vector<std::string>& parts, size_t from) {
  std::string out;
  for (size_t i = from; i < parts.size(); ++i) out += (out.empty() ? "" : ".") + parts[i];
  return out;
}

bool is_index(const std::string& s) {
  return !s.empty() && s.size() < 6 && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// ResBlock internals: LDM names <-> diffusers names.
const std::vector<std::pair<std::string, std::string>>& resnet_names() {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"in_layers.0", "norm1"},      {"in_layers.2", "conv1"},        {"out_layers.0", "norm2"},
      {"out_layers.3", "conv2"},     {"emb_layers.1", "time_emb_proj"}, {"skip_connection", "conv_shortcut"}};
  return names;
}

// Top-level modules: LDM names <-> diffusers names.
const std::vector<std::pair<std::string, std::string>>& top_level_names() {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"time_embed.0", "time_embedding.linear_1"}, {"time_embed.2", "time_embedding.linear_2"},
      {"label_emb.0.0", "add_embedding.linear_1"}, {"label_emb.0.2", "add_embedding.linear_2"},
      {"input_blocks.0.0", "conv_in"},             {"out.0", "conv_norm_out"},
      {"out.2", "conv_out"}};
  return names;
}

// Renames the head of `rest` by `table` (first: from, second: to), or returns it unchanged.
std::string rename_head(const std::string& rest, const std::vector<std::pair<std::string, std::string>>& table,
                        bool forward) {
  for (const auto& [ldm, diff] : table) {
    const std::string& from = forward ? ldm : diff;
    const std::string& to = forward ? diff : ldm;
    if (rest == from) return to;
    if (starts_with(rest, from + ".")) return to + rest.substr(from.size());
  }
  return rest;
}

std::string layer_path(const std::string& block, int index, int sub, const std::string& rest) {
  const std::string kind = sub == 0 ? "resnets" : "attentions";
  const std::string inner = sub == 0 ? rename_head(rest, resnet_names(), true) : rest;
  return block + "." + kind + "." + std::to_string(index) + (inner.empty() ? "" : "." + inner);
}

}  // namespace

std::string sgm_to_path(const std::string& sgm) {
  const std::string top = rename_head(sgm, top_level_names(), true);
  if (top != sgm) return top;
  const std::vector<std::string> p = split_dots(sgm);
  if (p.size() >= 2 && p[0] == "middle_block" && is_index(p[1])) {
    const int m = std::stoi(p[1]);
    const std::string rest = join_from(p, 2);
    if (m == 0) return layer_path("mid_block", 0, 0, rest);
    if (m == 1) return layer_path("mid_block", 0, 1, rest);
    if (m == 2) return layer_path("mid_block", 1, 0, rest);
    return "";
  }
  if (p.size() < 3 || !is_index(p[1]) || !is_index(p[2])) return "";
  const int n = std::stoi(p[1]), sub = std::stoi(p[2]);
  const std::string rest = join_from(p, 3);
  if (p[0] == "input_blocks") {
    if (n < 1) return "";
    const int b = (n - 1) / kSlots, slot = (n - 1) % kSlots;
    const std::string block = "down_blocks." + std::to_string(b);
    if (slot == kSlots - 1 || starts_with(rest, "op")) {  // Downsample: `op` is its conv
      if (sub != 0 || !(rest == "op" || starts_with(rest, "op."))) return "";
      return block + ".downsamplers.0.conv" + rest.substr(2);
    }
    if (sub > 1) return "";
    return layer_path(block, slot, sub, rest);
  }
  if (p[0] == "output_blocks") {
    const int b = n / kSlots, l = n % kSlots;
    const std::string block = "up_blocks." + std::to_string(b);
    // The Upsample comes after the layers: sub-index 2, or 1 in a block without attention.
    if (sub == 2 || (sub == 1 && (rest == "conv" || starts_with(rest, "conv."))))
      return block + ".upsamplers.0" + (rest.empty() ? "" : "." + rest);
    if (sub > 1) return "";
    return layer_path(block, l, sub, rest);
  }
  return "";
}

std::string path_to_sgm(const std::string& path, const std::set<int>& up_blocks_without_attention) {
  const std::string top = rename_head(path, top_level_names(), false);
  if (top != path) return top;
  const std::vector<std::string> p = split_dots(path);
  auto layer = [&](const std::string& kind, size_t at) -> std::pair<int, std::string> {  // sub-index, rest
    const std::string rest = join_from(p, at);
    if (kind == "resnets") return {0, rename_head(rest, resnet_names(), false)};
    return {1, rest};
  };
  auto join = [](const std::string& head, const std::string& rest) { return rest.empty() ? head : head + "." + rest; };
  if (p.size() >= 4 && (p[0] == "down_blocks" || p[0] == "up_blocks") && is_index(p[1]) && is_index(p[3])) {
    const int b = std::stoi(p[1]), l = std::stoi(p[3]);
    const bool down = p[0] == "down_blocks";
    if (p[2] == "downsamplers" && down && l == 0 && p.size() >= 5 && p[4] == "conv")
      return join("input_blocks." + std::to_string(kSlots * b + kSlots) + ".0.op", join_from(p, 5));
    if (p[2] == "upsamplers" && !down && l == 0) {
      const int sub = up_blocks_without_attention.count(b) ? 1 : 2;
      return join("output_blocks." + std::to_string(kSlots * b + kSlots - 1) + "." + std::to_string(sub), join_from(p, 4));
    }
    if (p[2] != "resnets" && p[2] != "attentions") return "";
    const auto [sub, rest] = layer(p[2], 4);
    const int n = down ? kSlots * b + l + 1 : kSlots * b + l;
    return join((down ? "input_blocks." : "output_blocks.") + std::to_string(n) + "." + std::to_string(sub), rest);
  }
  if (p.size() >= 3 && p[0] == "mid_block" && is_index(p[2])) {
    const int l = std::stoi(p[2]);
    int m = -1;
    if (p[1] == "resnets" && l <= 1) m = l == 0 ? 0 : 2;
    if (p[1] == "attentions" && l == 0) m = 1;
    if (m < 0) return "";
    return join("middle_block." + std::to_string(m), layer(p[1], 3).second);
  }
  return "";
}

bool is_sgm_kohya_name(const std::string& kohya_name) {
  for (const char* head : {"lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                           "lora_unet_time_embed_", "lora_unet_label_emb_", "lora_unet_out_"})
    if (starts_with(kohya_name, head)) return true;
  return false;
}

}  // namespace loom::io
