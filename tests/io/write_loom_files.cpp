// Writes safetensors files with loom and, next to them, expected.json (names, dtypes, shapes,
// values, metadata); tests/io/check_loom_files.py then reads them with the official package.
//
//   write_loom_files <output_dir>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/tensor_file.h"

using loom::DType;
using loom::Tensor;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <output_dir>\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  try {
    // Values exact in every dtype (bf16 has 8 significant bits).
    const std::vector<double> v = {1.0, -2.5, 0.15625, 3.0, 1024.0, -0.0078125};
    const std::vector<double> iv = {0, -7, 1099511627776.0, 5, 6, 7};
    std::vector<std::pair<std::string, Tensor>> numpy_file = {
        {"down_blocks.0.attn1.to_q.lora.down.weight", Tensor::from_values(v, {2, 3}, DType::F32)},
        {"b.f64", Tensor::from_values(v, {3, 2}, DType::F64)},
        {"c.f16", Tensor::from_values(v, {6}, DType::F16)},
        {"d.i64", Tensor::from_values(iv, {1, 6}, DType::I64)},
        {"lora_unet_x.alpha", Tensor::scalar(4.0, DType::F32)},
        {"empty", Tensor::empty({0, 3}, DType::F32)},
    };
    const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"written_by", "loom"}};
    std::vector<std::pair<std::string, Tensor>> bf16_file = {
        {"e.bf16", Tensor::from_values(v, {2, 3}, DType::BF16)},
        {"f.f32", Tensor::from_values(v, {6}, DType::F32)},
    };
    loom::io::write_safetensors(dir + "/numpy.safetensors", numpy_file, metadata);
    loom::io::write_safetensors(dir + "/bf16.safetensors", bf16_file);

    nlohmann::json expected;
    auto describe = [](const std::vector<std::pair<std::string, Tensor>>& ts) {
      nlohmann::json out = nlohmann::json::array();
      for (const auto& [name, t] : ts) {
        const char* dt = t.dtype() == DType::F32 ? "F32" : t.dtype() == DType::F64 ? "F64" : t.dtype() == DType::F16 ? "F16"
                         : t.dtype() == DType::BF16 ? "BF16" : "I64";
        out.push_back({{"name", name}, {"dtype", dt}, {"shape", t.shape()}, {"values", t.to_vector()}});
      }
      return out;
    };
    expected["numpy.safetensors"] = {{"metadata", metadata}, {"tensors", describe(numpy_file)}};
    expected["bf16.safetensors"] = {{"metadata", nlohmann::json::object()}, {"tensors", describe(bf16_file)}};
    std::ofstream(dir + "/expected.json") << expected.dump(1) << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "write_loom_files: %s\n", e.what());
    return 1;
  }
  return 0;
}
