#include "tensor/random.h"

#include <cmath>
#include <cstring>

#include "tensor/backend.h"
#include "tensor/error.h"

namespace loom {

namespace {
uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
}  // namespace

void Generator::manual_seed(uint64_t seed) {
  uint64_t x = seed;
  for (auto& s : s_) s = splitmix64(x);
  has_spare_ = false;
}

uint64_t Generator::next_u64() {  // xoshiro256**
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Generator::uniform() { return double(next_u64() >> 11) * 0x1.0p-53; }

double Generator::normal() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  double u1 = 0.0;
  while (u1 <= 0.0) u1 = uniform();
  const double u2 = uniform();
  const double r = std::sqrt(-2.0 * std::log(u1));
  const double theta = 2.0 * M_PI * u2;
  spare_ = r * std::sin(theta);
  has_spare_ = true;
  return r * std::cos(theta);
}

std::vector<uint64_t> Generator::state() const {
  uint64_t spare_bits;
  std::memcpy(&spare_bits, &spare_, sizeof spare_bits);
  return {s_[0], s_[1], s_[2], s_[3], uint64_t(has_spare_), spare_bits};
}

void Generator::set_state(const std::vector<uint64_t>& state) {
  LOOM_CHECK(state.size() == 6, "Generator::set_state: expected 6 words, got ", state.size());
  LOOM_CHECK(state[0] | state[1] | state[2] | state[3], "Generator::set_state: an all-zero state is invalid");
  for (int i = 0; i < 4; ++i) s_[i] = state[size_t(i)];
  has_spare_ = state[4] != 0;
  std::memcpy(&spare_, &state[5], sizeof spare_);
}

Generator& default_generator() {
  static Generator gen(0);
  return gen;
}

void manual_seed(uint64_t seed) { default_generator().manual_seed(seed); }

// ---- counter-based random tensors: checks -> RandomArgs -> the device's `random` slot ----------

namespace {

Tensor draw(const char* op, RandomKind kind, const Shape& shape, DType dtype, Device device, uint64_t seed,
            uint64_t offset, double p) {
  LOOM_CHECK(is_floating(dtype), op, ": dtype ", dtype, " is not a floating-point dtype (f32, f64, bf16, f16)");
  Backend& be = backend_for(op, OpKind::Random, device, dtype);
  RandomArgs a;
  a.out = Tensor::empty(shape, dtype, device);
  const uint64_t n = uint64_t(a.out.numel());
  LOOM_CHECK(n == 0 || offset <= UINT64_MAX - (n - 1), op, ": offset ", offset, " + ", n,
             " elements passes the end of the 2^64 counters");
  a.kind = kind, a.seed = seed, a.offset = offset, a.p = p;
  if (n > 0) be.random(a);
  return a.out;
}

}  // namespace

Tensor random_uniform(const Shape& shape, DType dtype, Device device, uint64_t seed, uint64_t offset) {
  return draw("random_uniform", RandomKind::Uniform, shape, dtype, device, seed, offset, 0.0);
}

Tensor random_normal(const Shape& shape, DType dtype, Device device, uint64_t seed, uint64_t offset) {
  return draw("random_normal", RandomKind::Normal, shape, dtype, device, seed, offset, 0.0);
}

Tensor random_dropout_mask(const Shape& shape, DType dtype, Device device, double p, uint64_t seed,
                           uint64_t offset) {
  LOOM_CHECK(p >= 0.0 && p < 1.0, "random_dropout_mask: probability must be in [0, 1), got ", p);
  return draw("random_dropout_mask", RandomKind::DropoutMask, shape, dtype, device, seed, offset, p);
}

}  // namespace loom
