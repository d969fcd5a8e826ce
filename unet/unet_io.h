// Loading a diffusers UNet2DConditionModel directory (SPEC §8):
//   config.json (UNet2DConditionModel fields) and the weights, the first found of
//     diffusion_pytorch_model.safetensors
//     diffusion_pytorch_model.safetensors.index.json (sharded; every shard it names)
//     diffusion_pytorch_model.fp16.safetensors / .fp16.safetensors.index.json
//     model.safetensors, model.h5 (loom's native names)
//   (with variant "fp16" the .fp16 files are looked for first).
// The load is strict: a missing, unexpected or mis-shaped key is an error that
// names it (and both shapes); so is a NaN/Inf weight (the key named; io::read_weight_file,
// which every model loader reads its files with). Weights are converted to the requested dtype.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "unet/unet.h"

namespace loom::unet {

// How a model directory is loaded (the UNet here, the VAE in unet/vae.h).
struct ModelLoadOptions {
  DType dtype = DType::F32;
  Device device = Device::cpu();
  std::string variant;  // "" or "fp16"
};
using UNetLoadOptions = ModelLoadOptions;

struct LoadedUNet {
  std::shared_ptr<UNet2DConditionModel> model;
  std::vector<std::string> weight_files;  // the files read
  std::vector<std::string> notes;         // config keys ignored, variant fallbacks, weights without checksums
};

// True when dir/config.json says `"_class_name": "UNet2DConditionModel"`.
bool is_unet_dir(const std::string& dir);
// The weights of a diffusers model directory (the UNet, the VAE) as one name -> tensor map (CPU,
// file dtypes), from the first file found in the order above; every file is read with
// io::read_weight_file (finite values; what a file could not check, e.g. an h5py model.h5 without
// checksums, goes to `notes`). `what` names the model in errors.
std::map<std::string, Tensor> read_model_weights(const std::string& dir, const std::string& variant,
                                                 std::vector<std::string>& files_read, const std::string& what,
                                                 std::vector<std::string>& notes);
LoadedUNet load_unet_dir(const std::string& dir, const UNetLoadOptions& options = {});

// The `--model` (and `--config`) of every UNet command (loom run, sample, train): a diffusers UNet
// directory (load_unet_dir; its config.json must say UNet2DConditionModel), or, with `config_path`,
// a single-file original checkpoint (load_unet_single_file, unet/ldm_checkpoint.h) built from that
// diffusers config.json. io::FileError naming the path for a file without a config ("needs
// --config"), a directory with one, or a directory that does not hold a UNet.
LoadedUNet load_unet(const std::string& model_path, const std::string& config_path,
                     const UNetLoadOptions& options = {});
// True when load_unet is the loader for these flags: a config is given, `model_path` is a file
// (a single-file checkpoint, which then needs --config), or is_unet_dir(model_path).
bool is_unet_model(const std::string& model_path, const std::string& config_path);

}  // namespace loom::unet
