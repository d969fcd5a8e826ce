// Model directories (config.json + weights) and the base fingerprint stored with adapters.
#include <sstream>
#include <sys/stat.h>

#include "io/adapter_detail.h"

namespace loom::io {

using namespace detail;

namespace {
bool file_exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
}  // namespace

std::shared_ptr<attention::Transformer2DModel> load_model_dir(const std::string& dir, const std::string& prefix,
                                                              DType dtype, std::vector<std::string>* notes) {
  const std::string config_path = dir + "/config.json";
  if (!file_exists(config_path)) throw FileError(config_path, "missing (a model directory holds config.json and weights)");
  attention::Transformer2DConfig config;
  try {
    config = attention::Transformer2DConfig::from_file(config_path);
  } catch (const FileError&) {
    throw;
  } catch (const Error& e) {
    throw FileError(config_path, e.what());
  }
  std::string weights;
  for (const char* name : {"model.safetensors", "diffusion_pytorch_model.safetensors", "model.h5"})
    if (weights.empty() && file_exists(dir + "/" + name)) weights = dir + "/" + name;
  if (weights.empty())
    throw FileError(dir, "no weights (expected model.safetensors, diffusion_pytorch_model.safetensors or model.h5)");
  std::vector<std::string> file_notes;
  const TensorFile file = read_weight_file(weights, file_notes);  // finite values, notes naming the file
  if (notes) notes->insert(notes->end(), file_notes.begin(), file_notes.end());
  std::map<std::string, Tensor> state;
  for (const auto& [key, t] : file.tensors) {
    if (prefix.empty()) {
      state[key] = t;
    } else if (starts_with(key, prefix + ".")) {
      state[key.substr(prefix.size() + 1)] = t;
    }
  }
  if (state.empty() && file.find("proj_in.weight") && file.find("norm.weight")) {
    // One block with bare keys (what save_pretrained of a Transformer2DModel writes): the prefix
    // then names where the block sits in the UNet, and only selects the adapters' keys (SPEC §9).
    for (const auto& [key, t] : file.tensors) state[key] = t;
  }
  if (state.empty())
    throw FileError(weights, "no key under the prefix '" + prefix +
                                 "' (and not one block with bare keys such as proj_in.weight, norm.weight)");
  Generator gen(0);
  auto model = std::make_shared<attention::Transformer2DModel>(config, gen, dtype);
  try {
    model->load_state_dict(state, /*strict=*/true);
  } catch (const Error& e) {
    throw FileError(weights, std::string(e.what()) + (prefix.empty() ? "" : " (prefix '" + prefix + "')"));
  }
  return model;
}

std::string base_fingerprint(const nn::Module& model, const std::vector<std::string>& module_paths) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over the f32 values
  auto mix = [&](const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  for (const std::string& path : module_paths) {
    const Variable w = model.find_parameter(path + ".weight");
    if (!w.defined()) continue;
    mix(path.data(), path.size());
    const Tensor t = w.tensor().to(Device::cpu()).to(DType::F32).contiguous();
    mix(t.raw_data(), size_t(t.numel()) * 4);
  }
  std::ostringstream os;
  os << std::hex << h;
  return os.str();
}

}  // namespace loom::io
