#include "unet/unet_io.h"

#include <filesystem>
#include <set>

#include "io/tensor_file.h"
#include "io/config_json.h"
#include "unet/ldm_checkpoint.h"

namespace loom::unet {

namespace fs = std::filesystem;
using io::config_json::json;

namespace {

// Adds the tensors of one weight file (io::read_weight_file: finite values, notes naming the file).
void add_tensors(const std::string& path, std::map<std::string, Tensor>& out, std::vector<std::string>& notes) {
  io::TensorFile f = io::read_weight_file(path, notes);
  for (auto& [name, t] : f.tensors) {
    if (out.count(name)) throw io::FileError(path, "tensor '" + name + "' also appears in another weight file");
    out.emplace(name, t);
  }
}

// A sharded checkpoint: the index's weight_map names the shard of every tensor.
void read_sharded(const std::string& index_path, std::map<std::string, Tensor>& out, std::vector<std::string>& files,
                  std::vector<std::string>& notes) {
  const json idx = io::config_json::read_json_file(index_path);
  if (!idx.is_object() || !idx.contains("weight_map") || !idx.at("weight_map").is_object())
    throw io::FileError(index_path, "no \"weight_map\" object");
  std::set<std::string> shards;
  for (const auto& [key, shard] : idx.at("weight_map").items()) {
    if (!shard.is_string()) throw io::FileError(index_path, "weight_map entry '" + key + "' is not a file name");
    shards.insert(shard.get<std::string>());
  }
  const fs::path dir = fs::path(index_path).parent_path();
  for (const std::string& s : shards) {
    const std::string p = (dir / s).string();
    add_tensors(p, out, notes);
    files.push_back(p);
  }
  for (const auto& [key, shard] : idx.at("weight_map").items())
    if (!out.count(key))
      throw io::FileError(index_path, "tensor '" + key + "' is listed for shard " + shard.get<std::string>() +
                                          " but that shard does not hold it");
}

}  // namespace

bool is_unet_dir(const std::string& dir) { return io::config_json::dir_has_class(dir, "UNet2DConditionModel"); }

std::map<std::string, Tensor> read_model_weights(const std::string& dir, const std::string& variant,
                                                 std::vector<std::string>& files_read, const std::string& what,
                                                 std::vector<std::string>& notes) {
  LOOM_CHECK(variant.empty() || variant == "fp16", what, " weights: variant \"", variant, "\" is not supported (fp16)");
  const fs::path d(dir);
  std::vector<std::string> order = {"diffusion_pytorch_model.safetensors",
                                    "diffusion_pytorch_model.safetensors.index.json",
                                    "diffusion_pytorch_model.fp16.safetensors",
                                    "diffusion_pytorch_model.fp16.safetensors.index.json", "model.safetensors",
                                    "model.h5"};
  if (variant == "fp16") std::swap_ranges(order.begin(), order.begin() + 2, order.begin() + 2);
  std::map<std::string, Tensor> out;
  for (const std::string& name : order) {
    const fs::path p = d / name;
    if (!fs::is_regular_file(p)) continue;
    if (name.size() > 11 && name.substr(name.size() - 11) == ".index.json") {
      read_sharded(p.string(), out, files_read, notes);
    } else {
      add_tensors(p.string(), out, notes);
      files_read.push_back(p.string());
    }
    return out;
  }
  std::string tried;
  for (const std::string& n : order) tried += (tried.empty() ? "" : ", ") + n;
  throw io::FileError(dir, "no " + what + " weights found (looked for " + tried + ")");
}

LoadedUNet load_unet_dir(const std::string& dir, const UNetLoadOptions& options) {
  const fs::path config_path = fs::path(dir) / "config.json";
  if (!fs::is_regular_file(config_path)) throw io::FileError(config_path.string(), "missing (a UNet directory holds config.json)");
  LoadedUNet r;
  const auto config = io::config_json::read_config_file<UNet2DConditionConfig>(config_path.string());
  r.notes = config.notes;
  Generator gen(0);  // the initial values are overwritten by the load
  r.model = std::make_shared<UNet2DConditionModel>(config, gen, options.dtype, options.device);
  const auto weights = read_model_weights(dir, options.variant, r.weight_files, "UNet", r.notes);
  try {
    r.model->load_state_dict(weights, true);
  } catch (const Error& e) {
    throw io::FileError(r.weight_files.empty() ? dir : r.weight_files.front(), e.what());
  }
  return r;
}

bool is_unet_model(const std::string& model_path, const std::string& config_path) {
  return !config_path.empty() || fs::is_regular_file(model_path) || is_unet_dir(model_path);
}

LoadedUNet load_unet(const std::string& model_path, const std::string& config_path, const UNetLoadOptions& options) {
  const bool is_dir = fs::is_directory(model_path);
  if (!config_path.empty()) {
    if (is_dir)
      throw io::FileError(model_path, "is a directory: --config " + config_path +
                                          " is for a single-file checkpoint (a UNet directory's own config.json "
                                          "is used; leave --config out)");
    return load_unet_single_file(model_path, config_path, options);
  }
  if (fs::is_regular_file(model_path))
    throw io::FileError(model_path, "is a single file: an original checkpoint (model.diffusion_model.… keys) needs "
                                    "--config with the diffusers UNet config.json");
  if (!is_dir) throw io::FileError(model_path, "no such file or directory");
  if (fs::exists(fs::path(model_path) / "config.json") && !is_unet_dir(model_path))
    throw io::FileError((fs::path(model_path) / "config.json").string(),
                        "does not say \"_class_name\": \"UNet2DConditionModel\" (a UNet directory's config.json "
                        "does; a single-file checkpoint needs --config)");
  return load_unet_dir(model_path, options);
}

}  // namespace loom::unet
