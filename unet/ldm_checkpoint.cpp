#include "unet/ldm_checkpoint.h"

#include <utility>
#include <vector>

#include "io/tensor_file.h"
#include "io/config_json.h"

namespace loom::unet {

namespace {

const char* const kUNetPrefix = "model.diffusion_model.";

// diffusers module prefix -> original prefix, built from the model's own structure.
std::map<std::string, std::string> prefix_map(const UNet2DConditionModel& model) {
  const auto& c = model.config();
  std::map<std::string, std::string> p = {
      {"time_embedding.linear_1", "time_embed.0"}, {"time_embedding.linear_2", "time_embed.2"},
      {"add_embedding.linear_1", "label_emb.0.0"}, {"add_embedding.linear_2", "label_emb.0.2"},
      {"conv_in", "input_blocks.0.0"},             {"conv_norm_out", "out.0"},
      {"conv_out", "out.2"},                       {"mid_block.resnets.0", "middle_block.0"},
      {"mid_block.attentions.0", "middle_block.1"}, {"mid_block.resnets.1", "middle_block.2"}};
  const size_t nb = c.block_out_channels.size();
  int64_t k = 1;
  for (size_t i = 0; i < nb; ++i) {
    const std::string b = "down_blocks." + std::to_string(i);
    for (int64_t j = 0; j < c.layers_per_block[i]; ++j, ++k) {
      p[b + ".resnets." + std::to_string(j)] = "input_blocks." + std::to_string(k) + ".0";
      p[b + ".attentions." + std::to_string(j)] = "input_blocks." + std::to_string(k) + ".1";
    }
    if (i + 1 < nb) p[b + ".downsamplers.0.conv"] = "input_blocks." + std::to_string(k++) + ".0.op";
  }
  k = 0;
  for (size_t i = 0; i < nb; ++i) {
    const std::string b = "up_blocks." + std::to_string(i);
    const int64_t layers = c.layers_per_block[nb - 1 - i] + 1;
    for (int64_t j = 0; j < layers; ++j, ++k) {
      p[b + ".resnets." + std::to_string(j)] = "output_blocks." + std::to_string(k) + ".0";
      p[b + ".attentions." + std::to_string(j)] = "output_blocks." + std::to_string(k) + ".1";
    }
    const bool cross = c.up_block_types[i] == "CrossAttnUpBlock2D";
    p[b + ".upsamplers.0.conv"] = "output_blocks." + std::to_string(k - 1) + (cross ? ".2.conv" : ".1.conv");
  }
  return p;
}

std::string rename_in_resnet(const std::string& rest) {
  static const std::pair<const char*, const char*> renames[] = {
      {"norm1.", "in_layers.0."},         {"conv1.", "in_layers.2."},  {"norm2.", "out_layers.0."},
      {"conv2.", "out_layers.3."},        {"time_emb_proj.", "emb_layers.1."},
      {"conv_shortcut.", "skip_connection."}};
  for (const auto& [from, to] : renames)
    if (rest.rfind(from, 0) == 0) return to + rest.substr(std::string(from).size());
  return rest;
}

// Same values, shape of `want`, when they differ only by trailing 1s (a 1×1 conv vs a Linear).
bool reshape_compatible(const Shape& got, const Shape& want) {
  auto strip = [](Shape s) {
    while (s.size() > 2 && s.back() == 1) s.pop_back();
    return s;
  };
  return strip(got) == strip(want);
}

}  // namespace

std::map<std::string, std::string> ldm_names(const UNet2DConditionModel& model) {
  const auto prefixes = prefix_map(model);
  std::map<std::string, std::string> out;
  for (const auto& [name, param] : model.named_parameters()) {
    std::string best;
    for (const auto& [from, to] : prefixes)
      if (name.size() > from.size() && name.compare(0, from.size(), from) == 0 && name[from.size()] == '.' &&
          from.size() > best.size())
        best = from;
    LOOM_CHECK(!best.empty(), "original checkpoint: no original name for parameter '", name, "'");
    std::string rest = name.substr(best.size() + 1);
    if (best.find(".resnets.") != std::string::npos) rest = rename_in_resnet(rest);
    out[name] = prefixes.at(best) + "." + rest;
  }
  return out;
}

LoadedUNet load_unet_single_file(const std::string& weights_path, const std::string& config_path,
                                 const UNetLoadOptions& options) {
  LoadedUNet r;
  const auto config = io::config_json::read_config_file<UNet2DConditionConfig>(config_path);
  r.notes = config.notes;
  Generator gen(0);
  r.model = std::make_shared<UNet2DConditionModel>(config, gen, options.dtype, options.device);
  const io::TensorFile file = io::read_weight_file(weights_path, r.notes);
  r.weight_files.push_back(weights_path);
  std::map<std::string, const Tensor*> unet_keys;  // original name (prefix stripped) -> tensor
  int64_t others = 0;
  for (const auto& [key, t] : file.tensors) {
    if (key.rfind(kUNetPrefix, 0) == 0) unet_keys[key.substr(std::string(kUNetPrefix).size())] = &t;
    else ++others;
  }
  if (unet_keys.empty())
    throw io::FileError(weights_path, "no 'model.diffusion_model.' keys: not an original (LDM/SGM) checkpoint");
  if (others > 0)
    r.notes.push_back(weights_path + ": skipped " + std::to_string(others) +
                      " keys of other models (VAE, text encoders, …)");
  std::map<std::string, Tensor> dict;
  const auto state = r.model->state_dict();
  for (const auto& [name, ldm] : ldm_names(*r.model)) {
    auto it = unet_keys.find(ldm);
    if (it == unet_keys.end())
      throw io::FileError(weights_path, "missing '" + std::string(kUNetPrefix) + ldm + "' (diffusers '" + name +
                                            "'): wrong config for this checkpoint?");
    Tensor t = *it->second;
    const Shape want = state.at(name).shape();
    if (t.shape() != want && reshape_compatible(t.shape(), want)) t = t.reshape(want);
    if (t.shape() != want)
      throw io::FileError(weights_path, ::loom::detail::concat("key '", kUNetPrefix, ldm, "' (diffusers '", name,
                                                               "') has shape ", it->second->shape(), " but the model "
                                                               "built from ", config_path, " needs ", want,
                                                               ": wrong config for this checkpoint?"));
    dict[name] = t;
    unet_keys.erase(it);
  }
  if (!unet_keys.empty())
    throw io::FileError(weights_path, "UNet key '" + std::string(kUNetPrefix) + unet_keys.begin()->first +
                                          "' has no place in the model built from " + config_path + " (and " +
                                          std::to_string(unet_keys.size() - 1) + " more): wrong config?");
  try {
    r.model->load_state_dict(dict, true);
  } catch (const Error& e) {
    throw io::FileError(weights_path, e.what());
  }
  return r;
}

}  // namespace loom::unet
