// The tiny UNets of tests/unet/fixtures as the command-line tests use them (loom run / sample /
// train of a UNet): paths, and golden.safetensors' inputs as a `loom run` input file. Needs
// LOOM_UNET_FIXTURE_DIR (tests/CMakeLists.txt) and tests/cli/cli_fixture.h first.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "io/tensor_file.h"

#ifndef LOOM_UNET_FIXTURE_DIR
#error "LOOM_UNET_FIXTURE_DIR must name tests/unet/fixtures"
#endif

namespace loom {

// tests/unet/fixtures/<name> (a UNet directory such as "sd1", or a file below the fixtures).
inline std::string unet_fixture(const std::string& name) { return std::string(LOOM_UNET_FIXTURE_DIR) + "/" + name; }

// <model>/golden.safetensors' inputs (sample, timestep, encoder_hidden_states, …) in f32, without
// diffusers' outputs (which loom run would report as unused), written to `file`; returns `file`.
inline std::string write_golden_inputs(const std::string& model, const std::string& file) {
  const io::TensorFile f = io::read_tensor_file(unet_fixture(model + "/golden.safetensors"));
  std::vector<std::pair<std::string, Tensor>> in;
  for (const auto& [name, t] : f.tensors)
    if (name.rfind("output", 0) != 0) in.emplace_back(name, t.to(DType::F32));
  io::write_safetensors(file, in);
  return file;
}

// diffusers' output for those inputs, computed in f32.
inline Tensor golden_output(const std::string& model) {
  return *io::read_tensor_file(unet_fixture(model + "/golden.safetensors")).find("output_f32");
}

}  // namespace loom
