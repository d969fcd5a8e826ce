// Deterministic algorithms on CUDA (tensor/determinism.h; SPEC §7, `--deterministic`): the flash
// backward repeats bit for bit under set_deterministic_algorithms(true) on every kernel family that
// adds with atomics otherwise — Hopper's wgmma backward (d = 40, 64), the mma.sync one (d = 80),
// f32 with TF32 allowed — at shapes whose query tiles the default grid splits over blocks (few
// problems, long sequences), and its results stay within the usual error of the default path's.
// ctest -L gpu; skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "tensor/backend.h"
#include "tensor/determinism.h"
#include "tensor/precision.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using loom::testing::FlashSlotResult;
using loom::testing::rel_error;
using loom::testing::run_flash_slot;

// Sets the switch for the scope, off again afterwards.
struct DeterministicScope {
  explicit DeterministicScope(bool on) { set_deterministic_algorithms(on); }
  ~DeterministicScope() { set_deterministic_algorithms(false); }
};

struct Tf32Scope {
  explicit Tf32Scope(bool on) { set_allow_tf32(on); }
  ~Tf32Scope() { set_allow_tf32(false); }
};

bool same_bits(const Tensor& a, const Tensor& b) { return a.to_vector() == b.to_vector(); }

TEST(GpuDeterminism, FlashBackwardRepeatsBitForBit) {
  LOOM_SKIP_WITHOUT_CUDA();
  struct Case {
    DType dtype;
    bool tf32;
    int64_t n, len, d;
  };
  // one or two problems of ~1000–3000 queries: the default grid splits their query tiles
  const std::vector<Case> cases = {{DType::BF16, false, 1, 3001, 64}, {DType::F16, false, 2, 1500, 40},
                                   {DType::BF16, false, 1, 1300, 80}, {DType::F32, true, 1, 1031, 64}};
  Generator gen(0x5eedu);
  for (const Case& c : cases) {
    const std::string what = std::string(dtype_name(c.dtype)) + (c.tf32 ? " with TF32" : "") + " N" +
                              std::to_string(c.n) + " L" + std::to_string(c.len) + " d" + std::to_string(c.d);
    FlashAttentionArgs a;
    a.q = Tensor::randn({c.n, c.len, c.d}, gen, DType::F64);
    a.k = Tensor::randn({c.n, c.len, c.d}, gen, DType::F64);
    a.v = Tensor::randn({c.n, c.len, c.d}, gen, DType::F64);
    a.scale = 1.0 / std::sqrt(double(c.d));
    const Tensor up = Tensor::randn({c.n, c.len, c.d}, gen, DType::F64);
    Tf32Scope tf32(c.tf32);
    const FlashSlotResult plain = run_flash_slot(a, up, c.dtype, Device::cuda(0));
    DeterministicScope on(true);
    const FlashSlotResult first = run_flash_slot(a, up, c.dtype, Device::cuda(0));
    const FlashSlotResult second = run_flash_slot(a, up, c.dtype, Device::cuda(0));
    EXPECT_TRUE(same_bits(first.out, second.out)) << what << ": out";
    EXPECT_TRUE(same_bits(first.dq, second.dq)) << what << ": dq";
    EXPECT_TRUE(same_bits(first.dk, second.dk)) << what << ": dk";
    EXPECT_TRUE(same_bits(first.dv, second.dv)) << what << ": dv";
    const double tol = c.dtype == DType::F32 ? 5e-3 : 2e-2;  // TF32 (plain) against exact f32 (deterministic)
    for (const auto& [name, x, y] : {std::tuple{"dq", first.dq, plain.dq}, std::tuple{"dk", first.dk, plain.dk},
                                     std::tuple{"dv", first.dv, plain.dv}})
      EXPECT_LE(rel_error(x, y), tol) << what << ": " << name << " against the default path";
  }
}

}  // namespace
}  // namespace loom::test
