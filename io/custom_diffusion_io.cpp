// Custom Diffusion files: detection, loading into a model (installing the processors), saving.
#include "adapters/custom_diffusion.h"
#include "io/adapter_detail.h"

namespace loom::io {

using namespace detail;

bool is_custom_diffusion_file(const TensorFile& file) {
  for (const auto& [key, t] : file.tensors)
    if (key.find("_custom_diffusion") != std::string::npos) return true;
  return false;
}

AdapterLoadReport load_custom_diffusion(nn::Module& model, const std::string& path, const AdapterLoadOptions& options) {
  const TensorFile file = read_tensor_file(path);
  AdapterLoadReport report;
  report.file = path;
  report.notes = file.notes;
  report.families.insert(KeyFamily::CustomDiffusion);
  bool has_q = false;
  for (const auto& [key, t] : file.tensors) has_q = has_q || key.find("to_q_custom_diffusion") != std::string::npos;
  bool installed = false;
  for (const auto& [name, p] : model.named_parameters()) installed = installed || name.find("_custom_diffusion") != std::string::npos;
  if (!installed) adapters::apply_custom_diffusion(model, has_q ? "crossattn" : "crossattn_kv");
  std::vector<std::pair<Variable, Tensor>> assign;
  for (const auto& [raw, tensor] : file.tensors) {
    const std::string key = strip_component(raw);
    if (key.find("_custom_diffusion") == std::string::npos) {
      report.unmatched.push_back(raw);
      continue;
    }
    std::string name = key;
    if (!options.prefix.empty()) {
      if (!starts_with(key, options.prefix + ".")) {
        report.outside_prefix.push_back(raw);
        continue;
      }
      name = key.substr(options.prefix.size() + 1);
    }
    const Variable p = model.find_parameter(name);
    if (!p.defined()) {
      report.unmatched.push_back(raw);
      continue;
    }
    if (p.shape() != tensor.shape()) {
      report.shape_mismatches.push_back({raw, p.shape(), tensor.shape()});
      continue;
    }
    if (!all_finite(tensor)) report.non_finite.push_back(raw);
    report.matched.push_back(raw);
    assign.emplace_back(p, tensor);
  }
  if (assign.empty()) strict_fail(path, "no Custom Diffusion key matches the model");
  if (options.strict) check_strict(report, path);
  NoGradGuard no_grad;
  for (auto& [p, t] : assign) p.tensor().copy_(t);  // same Variables: optimizers keep working
  return report;
}

void save_custom_diffusion(const nn::Module& model, const std::string& path, const std::string& prefix) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& [name, p] : model.named_parameters()) {
    if (name.find("_custom_diffusion") == std::string::npos) continue;
    LOOM_CHECK(all_finite(p.tensor()), "save_custom_diffusion: '", name, "' holds NaN or Inf; refusing to write ", path);
    tensors.emplace_back(join_path(prefix, name), p.tensor().to(Device::cpu()).contiguous());
  }
  LOOM_CHECK(!tensors.empty(), "save_custom_diffusion: the model has no Custom Diffusion parameters");
  if (ends_with(path, ".h5") || ends_with(path, ".hdf5")) {
    write_hdf5(path, tensors, {{"format", std::string("loom")}, {"format_version", int64_t(1)},
                               {"kind", std::string("custom_diffusion")}, {"prefix", prefix}});
  } else {
    write_safetensors(path, tensors, {{"format", "pt"}});
  }
}

}  // namespace loom::io
