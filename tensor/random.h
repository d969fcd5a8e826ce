// Seeded random numbers. A Generator is a xoshiro256** stream seeded through
// splitmix64: the same seed gives the same numbers on every run and platform.
// Device tensors are filled on the host and copied, so the numbers never depend
// on the device either.
#pragma once

#include <cstdint>
#include <vector>

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

// The process-wide generator used where none is passed.
Generator& default_generator();
void manual_seed(uint64_t seed);

}  // namespace loom
