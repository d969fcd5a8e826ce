// Seeded random numbers, two kinds:
//  - Generator: a xoshiro256** stream seeded through splitmix64, drawn on the host (weight
//    initialisation, Tensor::randn/rand: device tensors are filled on the host and copied).
//  - Counter-based tensors (random_uniform, random_normal, random_dropout_mask): drawn on the
//    tensor's device by the Backend's `random` slot from Philox4x32-10 (tensor/philox.h), element i
//    a pure function of (seed, offset + i), so the same numbers come out on the CPU and CUDA, bit
//    for bit, without a host round trip. A Generator hands out seeds for them (next_u64()).
// The same seed gives the same numbers on every run, platform and device.
#pragma once

#include <cstdint>
#include <vector>

#include "tensor/tensor.h"

namespace loom {

class Generator {
 public:
  explicit Generator(uint64_t seed = 0) { manual_seed(seed); }
  void manual_seed(uint64_t seed);
  uint64_t next_u64();
  double uniform();  // [0, 1), 53 random bits
  double normal();   // standard normal (Box–Muller)

  // The complete state (6 words: the xoshiro state, whether a spare normal is
  // cached, and its bits), so a checkpoint can resume the exact stream.
  std::vector<uint64_t> state() const;
  void set_state(const std::vector<uint64_t>& state);  // throws on a wrong size

 private:
  uint64_t s_[4];
  bool has_spare_ = false;
  double spare_ = 0.0;
};

// ---- counter-based random tensors -------------------------------------------------------------
// dtype: f32, f64, bf16 or f16; the result is contiguous on `device`. A draw of n elements uses
// the Philox counters [offset, offset + n): two draws with one seed do not overlap when their
// counter ranges are disjoint (e.g. the second at offset + n), and draws with different seeds are
// independent streams. offset + n must not exceed 2⁶⁴.

// Uniform on [0, 1), on the grid 2⁻ᵈ of the dtype's significand bits d (53, 24, 11, 8).
Tensor random_uniform(const Shape& shape, DType dtype, Device device, uint64_t seed, uint64_t offset = 0);
// Standard normal (Box–Muller on the Philox words, computed in double, rounded once).
Tensor random_normal(const Shape& shape, DType dtype, Device device, uint64_t seed, uint64_t offset = 0);
// Inverted dropout's mask: 1/(1 − p) where an element is kept (probability 1 − p), 0 where it is
// dropped; 0 ≤ p < 1.
Tensor random_dropout_mask(const Shape& shape, DType dtype, Device device, double p, uint64_t seed,
                           uint64_t offset = 0);

// The process-wide generator used where none is passed.
Generator& default_generator();
void manual_seed(uint64_t seed);

}  // namespace loom
