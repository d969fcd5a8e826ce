// Training checkpoints: adapter weights, optimizer state, step, RNG state and
// the run's options in one loom HDF5 file (kind = "checkpoint"), written
// atomically. Loading one and training on gives, on the CPU, bit for bit what
// an uninterrupted run gives.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "tensor/tensor.h"

namespace loom::io {

struct Checkpoint {
  std::string adapter_kind;                              // "lora" | "custom_diffusion"
  std::vector<std::pair<std::string, Tensor>> adapter;   // trainable tensors by name
  std::map<std::string, Tensor> optimizer;               // Optimizer::state_dict()
  int64_t step = 0;                                      // optimizer steps taken
  std::vector<uint64_t> rng_state;                       // Generator::state()
  std::string options_json;                              // the run's options (optimizer, schedule, data, ...)
  std::vector<double> losses;                            // the loss of every step so far
};

void save_checkpoint(const std::string& path, const Checkpoint& checkpoint);
// Throws FileError naming the file when it is not a loom checkpoint or is incomplete.
Checkpoint load_checkpoint(const std::string& path);

}  // namespace loom::io
