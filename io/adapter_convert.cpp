// Converting adapter files between families without a model.
#include "io/adapter_detail.h"

namespace loom::io {

using namespace detail;

void convert_adapter_file(const std::string& in, const std::string& out, KeyFamily family) {
  const TensorFile file = read_tensor_file(in);
  if (is_custom_diffusion_file(file)) {
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const auto& [key, t] : file.tensors) tensors.emplace_back(strip_component(key), t);
    if (family == KeyFamily::Loom)
      write_hdf5(out, tensors, {{"format", std::string("loom")}, {"format_version", int64_t(1)},
                                {"kind", std::string("custom_diffusion")}});
    else
      write_safetensors(out, tensors, {{"format", "pt"}});
    return;
  }
  const RawLora raw = read_raw_lora(file, in);
  if (raw.modules.empty()) throw FileError(in, "holds no LoRA or Custom Diffusion weights to convert");
  for (const auto& [p, m] : raw.modules)
    for (const Tensor* t : {&m.down, &m.up})
      if (!all_finite(*t)) throw FileError(in, "module '" + p + "' holds NaN or Inf values");
  write_raw_lora(out, raw, family, {});
}


}  // namespace loom::io
