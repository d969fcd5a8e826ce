// Writes a small HDF5 file with loom (io/hdf5_write.cpp) for tests/io/check_loom_h5.py, which reads it
// with h5py (CTest: io_h5py_interop). Usage: write_h5_sample OUT.h5
#include <cstdio>
#include <exception>
#include <string>

#include "io/tensor_file.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT.h5\n", argv[0]);
    return 2;
  }
  using loom::DType;
  using loom::Tensor;
  try {
    std::vector<double> down, up;
    for (int i = 0; i < 8; ++i) down.push_back(0.5 * i - 1.0);
    for (int i = 0; i < 6; ++i) up.push_back(0.375 * i + 0.0625);  // exact in binary: no FMA-dependent rounding
    const std::string q = "unet.down_blocks.0.attn1.to_q";
    std::vector<std::pair<std::string, Tensor>> tensors = {
        {q + ".lora.down.weight", Tensor::from_values(down, {2, 4}, DType::F32)},
        {q + ".lora.up.weight", Tensor::from_values(up, {3, 2}, DType::F64)},
        {"scalar", Tensor::scalar(2.5)},
        {"empty", Tensor::zeros({0, 3})},
        {"steps", Tensor::from_vector<int64_t>({1, -2, 9007199254740993LL}, {3})},
        {"half", Tensor::from_values({1.5, -0.15625}, {2}, DType::BF16)},
    };
    const loom::io::Attributes root = {{"format", std::string("loom")},
                                       {"format_version", int64_t(1)},
                                       {"kind", std::string("lora")},
                                       {"base_fingerprint", std::string("sha256:00ff")},
                                       {"note", std::string("\xc3\xbcnic\xc3\xb6" "de")}};
    const std::map<std::string, loom::io::Attributes> groups = {
        {q, {{"rank", int64_t(2)}, {"alpha", 4.0}, {"scaling", std::string("alpha/r")}}},
        {"extra.group", {{"empty_string", std::string()}, {"big", int64_t(-9223372036854775807LL - 1)}}},
    };
    loom::io::write_hdf5(argv[1], tensors, root, groups);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "write_h5_sample: %s\n", e.what());
    return 1;
  }
  return 0;
}
