// Converting adapter files between families without a model.
#include "io/adapter_detail.h"

namespace loom::io {

using namespace detail;

std::string ConvertReport::summary() const {
  std::string s = std::to_string(unet_modules) + " UNet modules, " + std::to_string(text_encoder_modules) +
                  " text-encoder modules";
  if (!skipped.empty())
    s += "; " + std::to_string(skipped.size()) + " keys not converted (not adapter weights), first '" + skipped.front() + "'";
  return s;
}

ConvertReport convert_adapter_file(const std::string& in, const std::string& out, KeyFamily family,
                                   const WriteOptions& options) {
  ConvertReport report;
  const TensorFile file = read_tensor_file(in);
  if (is_custom_diffusion_file(file)) {
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const auto& [key, t] : file.tensors) {
      if (!all_finite(t)) throw FileError(in, "key '" + key + "' holds NaN or Inf values (not converted)");
      tensors.emplace_back(strip_component(key), t);
    }
    if (family == KeyFamily::Loom)
      write_hdf5(out, tensors, {{"format", std::string("loom")}, {"format_version", int64_t(1)},
                                {"kind", std::string("custom_diffusion")}});
    else
      write_safetensors(out, tensors, {{"format", "pt"}});
    report.unet_modules = tensors.size();
    return report;
  }
  const RawLora raw = read_raw_lora(file, in);
  if (raw.modules.empty()) throw FileError(in, "holds no LoRA or Custom Diffusion weights to convert");
  for (const auto& [p, m] : raw.modules)
    for (const Tensor* t : m.tensors())
      if (!all_finite(*t)) throw FileError(in, "module '" + p + "' holds NaN or Inf values (not converted)");
  write_raw_lora(out, raw, family, {}, options);
  for (const auto& [p, m] : raw.modules) ++(is_text_encoder_path(p) ? report.text_encoder_modules : report.unet_modules);
  report.skipped = raw.skipped;
  return report;
}


}  // namespace loom::io
