#include "io/checkpoint.h"

#include <cstring>

#include "io/tensor_file.h"

namespace loom::io {

namespace {
constexpr const char* kAdapter = "adapter.";
constexpr const char* kOptimizer = "optimizer.";
constexpr const char* kRng = "rng_state";
constexpr const char* kLosses = "losses";

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }

template <typename T>
const T* attribute(const TensorFile& f, const std::string& key) {
  auto it = f.attributes.find(key);
  return it == f.attributes.end() ? nullptr : std::get_if<T>(&it->second);
}
}  // namespace

void save_checkpoint(const std::string& path, const Checkpoint& c) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& [name, t] : c.adapter) tensors.emplace_back(kAdapter + name, t.to(Device::cpu()).contiguous());
  for (const auto& [name, t] : c.optimizer) tensors.emplace_back(kOptimizer + name, t.to(Device::cpu()).contiguous());
  std::vector<int64_t> rng(c.rng_state.size());  // the uint64 words, bit for bit
  std::memcpy(rng.data(), c.rng_state.data(), rng.size() * sizeof(int64_t));
  tensors.emplace_back(kRng, Tensor::from_vector(rng, {int64_t(rng.size())}));
  tensors.emplace_back(kLosses, Tensor::from_vector(c.losses, {int64_t(c.losses.size())}));
  const Attributes root{{"format", std::string("loom")},        {"format_version", int64_t(1)},
                        {"kind", std::string("checkpoint")},    {"adapter_kind", c.adapter_kind},
                        {"step", c.step},                       {"options", c.options_json}};
  write_hdf5(path, tensors, root);
}

Checkpoint load_checkpoint(const std::string& path) {
  const TensorFile f = read_hdf5(path);
  const std::string* format = attribute<std::string>(f, "format");
  const std::string* kind = attribute<std::string>(f, "kind");
  if (!format || *format != "loom" || !kind || *kind != "checkpoint")
    throw FileError(path, "not a loom checkpoint (root attributes format='loom', kind='checkpoint' missing)");
  Checkpoint c;
  const int64_t* step = attribute<int64_t>(f, "step");
  const std::string* options = attribute<std::string>(f, "options");
  const std::string* adapter_kind = attribute<std::string>(f, "adapter_kind");
  if (!step || !options || !adapter_kind) throw FileError(path, "checkpoint lacks step, options or adapter_kind");
  c.step = *step, c.options_json = *options, c.adapter_kind = *adapter_kind;
  for (const auto& [name, t] : f.tensors) {
    if (starts_with(name, kAdapter)) {
      c.adapter.emplace_back(name.substr(std::strlen(kAdapter)), t);
    } else if (starts_with(name, kOptimizer)) {
      c.optimizer[name.substr(std::strlen(kOptimizer))] = t;
    } else if (name == kRng) {
      if (t.dtype() != DType::I64 || t.dim() != 1) throw FileError(path, "rng_state must be a 1-D i64 dataset");
      c.rng_state.resize(size_t(t.numel()));
      std::memcpy(c.rng_state.data(), t.raw_data(), c.rng_state.size() * sizeof(uint64_t));
    } else if (name == kLosses) {
      if (t.dtype() != DType::F64 || t.dim() != 1) throw FileError(path, "losses must be a 1-D f64 dataset");
      c.losses = t.to_vector();
    } else {
      throw FileError(path, "unexpected dataset '" + name + "' in a checkpoint");
    }
  }
  if (c.adapter.empty()) throw FileError(path, "checkpoint holds no adapter weights");
  if (c.rng_state.empty()) throw FileError(path, "checkpoint holds no rng_state");
  return c;
}

}  // namespace loom::io
