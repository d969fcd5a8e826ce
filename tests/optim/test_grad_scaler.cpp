// Dynamic loss scaling on the CPU: the fused unscale + finite check (ops::unscale_check_finite,
// the Backend's UnscaleCheckFinite slot) against a loop written here, over many odd-sized
// tensors in every floating dtype, with inf / nan / overflow placed anywhere; and
// optim::GradScaler's PyTorch semantics (scale 2^16, ×0.5 and restart on a non-finite step,
// ×2 after growth_interval clean steps, state round trip). The trainer's use of it (skipped
// steps logged, resume) is tested through `loom train` in tests/cli/test_cli_precision.cpp;
// the CUDA kernel against this one in tests/gpu/test_gpu_random.cpp.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "autograd/ops.h"
#include "optim/optim.h"
#include "tensor/ops.h"
#include "tensor/ops_fused.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom {
namespace {

using loom::testing::error_of;
using ::testing::HasSubstr;

const std::vector<int64_t> kSizes = {1, 7, 333, 4097, 40 * 33 + 1, 5};
constexpr double kInf = std::numeric_limits<double>::infinity();

// Tensors of kSizes in `dtype`, normal values times 100, on the CPU.
std::vector<Tensor> make_grads(DType dtype, uint64_t seed) {
  std::vector<Tensor> g;
  for (size_t i = 0; i < kSizes.size(); ++i)
    g.push_back(ops::mul_scalar(random_normal({kSizes[i]}, DType::F64, Device::cpu(), seed, 1000 * i), 100.0).to(dtype));
  return g;
}

// The reference: v·inv in the compute type (float for f32/bf16/f16, double for f64), rounded to dtype.
std::vector<double> unscaled(const Tensor& g, double inv) {
  std::vector<double> out;
  for (double v : g.to_vector()) {
    if (g.dtype() == DType::F64) out.push_back(v * inv);
    else out.push_back(float(v) * float(inv));
  }
  if (g.dtype() == DType::F64) return out;
  return Tensor::from_values(out, g.shape(), DType::F64).to(DType::F32).to(g.dtype()).to_vector();
}

std::vector<Tensor> clones(const std::vector<Tensor>& ts) {
  std::vector<Tensor> c;
  for (const Tensor& t : ts) c.push_back(t.clone());
  return c;
}

TEST(UnscaleCheckFinite, FiniteGradientsAreScaledInPlaceAndTheFlagStaysZero) {
  for (DType t : {DType::F32, DType::F64, DType::BF16, DType::F16}) {
    SCOPED_TRACE(dtype_name(t));
    const std::vector<Tensor> before = make_grads(t, 3);
    const std::vector<Tensor> grads = clones(before);
    const Tensor found = Tensor::zeros({1});
    const double inv = 1.0 / 1024.0 * 3.0;  // not a power of two: rounding matters
    ops::unscale_check_finite(grads, found, inv);
    EXPECT_EQ(found.item(), 0.0);
    for (size_t i = 0; i < grads.size(); ++i) EXPECT_EQ(grads[i].to_vector(), unscaled(before[i], inv)) << i;
  }
}

TEST(UnscaleCheckFinite, AnInfOrNanAnywhereSetsTheFlag) {
  for (DType t : {DType::F32, DType::F64, DType::BF16, DType::F16}) {
    for (double bad : {kInf, -kInf, std::nan("")}) {
      for (size_t which : {size_t(0), size_t(3), kSizes.size() - 1}) {
        SCOPED_TRACE(std::string(dtype_name(t)) + " value " + std::to_string(bad) + " in tensor " +
                     std::to_string(which));
        std::vector<Tensor> grads = make_grads(t, 4);
        const int64_t at = kSizes[which] - 1;  // the last element: the end of a chunk / thread range
        grads[which].narrow(0, at, 1).fill_(bad);
        const Tensor found = Tensor::zeros({1});
        ops::unscale_check_finite(grads, found, 0.5);
        EXPECT_EQ(found.item(), 1.0);
      }
    }
  }
}

TEST(UnscaleCheckFinite, TheFlagIsNeverCleared) {
  const std::vector<Tensor> grads = make_grads(DType::F32, 5);
  const Tensor found = Tensor::full({1}, 1.0);
  ops::unscale_check_finite(grads, found, 1.0);
  EXPECT_EQ(found.item(), 1.0);
}

TEST(UnscaleCheckFinite, MixedDtypesAndEmptyTensors) {
  std::vector<Tensor> grads{Tensor::full({3}, 2.0, DType::F64), Tensor::zeros({0}), Tensor::full({2}, 4.0, DType::BF16)};
  const Tensor found = Tensor::zeros({1});
  ops::unscale_check_finite(grads, found, 0.25);
  EXPECT_EQ(grads[0].to_vector(), std::vector<double>(3, 0.5));
  EXPECT_EQ(grads[2].to_vector(), std::vector<double>(2, 1.0));
  EXPECT_EQ(found.item(), 0.0);
}

TEST(UnscaleCheckFinite, Errors) {
  const Tensor found = Tensor::zeros({1});
  EXPECT_THAT(error_of([&] { ops::unscale_check_finite({Tensor::ones({2})}, Tensor::zeros({2}), 1.0); }),
              HasSubstr("found_inf must be one f32 element"));
  EXPECT_THAT(error_of([&] { ops::unscale_check_finite({Tensor::ones({2})}, Tensor::zeros({1}, DType::F64), 1.0); }),
              HasSubstr("found_inf must be one f32 element"));
  EXPECT_THAT(error_of([&] { ops::unscale_check_finite({Tensor::ones({2}, DType::I64)}, found, 1.0); }),
              HasSubstr("not floating-point"));
  EXPECT_THAT(error_of([&] { ops::unscale_check_finite({Tensor::ones({3, 2}).transpose(0, 1)}, found, 1.0); }),
              HasSubstr("not contiguous"));
  EXPECT_THAT(error_of([&] { ops::unscale_check_finite({Tensor()}, found, 1.0); }), HasSubstr("undefined"));
  EXPECT_THAT(error_of([&] { ops::unscale_check_finite({Tensor::ones({2})}, found, kInf); }),
              HasSubstr("inv_scale must be finite"));
}

// ---- GradScaler --------------------------------------------------------------------------------

TEST(GradScaler, DefaultsAreTorchs) {
  const optim::GradScaler s;
  EXPECT_EQ(s.scale(), 65536.0);
  EXPECT_EQ(s.options().growth_factor, 2.0);
  EXPECT_EQ(s.options().backoff_factor, 0.5);
  EXPECT_EQ(s.options().growth_interval, 2000);
  EXPECT_EQ(s.growth_tracker(), 0);
}

TEST(GradScaler, ScaledLossGivesScaledGradientsThatUnscaleBack) {
  const optim::GradScaler s;
  Variable w(Tensor::from_values({1.5, -2.0, 0.25}, {3}), true);
  const Variable loss = sum(w * w);
  s.scale_loss(loss).backward();
  EXPECT_EQ(w.grad().to_vector(), (std::vector<double>{3.0 * 65536, -4.0 * 65536, 0.5 * 65536}));
  EXPECT_FALSE(s.unscale({w}));
  EXPECT_EQ(w.grad().to_vector(), (std::vector<double>{3.0, -4.0, 0.5}));
}

TEST(GradScaler, OverflowIsFoundAndTheScaleHalvesThenGrowsAfterTheInterval) {
  optim::GradScalerOptions o;
  o.growth_interval = 3;
  optim::GradScaler s(o);
  Variable w(Tensor::ones({4}), true);
  w.set_grad(Tensor::from_values({1.0, kInf, 2.0, 3.0}, {4}));
  EXPECT_TRUE(s.unscale({w}));
  s.update(true);
  EXPECT_EQ(s.scale(), 32768.0);
  s.update(true);
  EXPECT_EQ(s.scale(), 16384.0);
  s.update(false), s.update(false);
  EXPECT_EQ(s.scale(), 16384.0);
  EXPECT_EQ(s.growth_tracker(), 2);
  s.update(true);  // a non-finite step restarts the count
  EXPECT_EQ(s.scale(), 8192.0);
  EXPECT_EQ(s.growth_tracker(), 0);
  for (int i = 0; i < 3; ++i) s.update(false);
  EXPECT_EQ(s.scale(), 16384.0);
  EXPECT_EQ(s.growth_tracker(), 0);
}

TEST(GradScaler, UndefinedGradientsAreSkippedAndSharedOnesCopiedFirst) {
  const optim::GradScaler s;
  Variable a(Tensor::ones({2}), true), b(Tensor::ones({2}), true), none(Tensor::ones({2}), true);
  const Tensor shared = Tensor::full({2}, 65536.0);
  a.set_grad(shared);
  b.set_grad(shared);  // one tensor held by two leaves: each must be divided once
  EXPECT_FALSE(s.unscale({a, none, b}));
  EXPECT_EQ(a.grad().to_vector(), std::vector<double>(2, 1.0));
  EXPECT_EQ(b.grad().to_vector(), std::vector<double>(2, 1.0));
  EXPECT_EQ(shared.to_vector(), std::vector<double>(2, 65536.0));  // what the caller holds is untouched
  EXPECT_FALSE(none.grad().defined());
  EXPECT_FALSE(s.unscale({none}));
}

TEST(GradScaler, StateRoundTripsAndBadStateIsRefused) {
  optim::GradScaler s;
  s.update(true);
  s.update(false);
  optim::GradScaler t;
  t.load_state_dict(s.state_dict());
  EXPECT_EQ(t.scale(), 32768.0);
  EXPECT_EQ(t.growth_tracker(), 1);
  EXPECT_THAT(error_of([&] { t.load_state_dict({}); }), HasSubstr("missing 'scale'"));
  auto bad = s.state_dict();
  bad["scale"] = Tensor::from_values({-1.0}, {1}, DType::F64);
  EXPECT_THAT(error_of([&] { t.load_state_dict(bad); }), HasSubstr("scale must be > 0"));
  bad = s.state_dict();
  bad["growth_tracker"] = Tensor::from_values({2000.0}, {1}, DType::F64);
  EXPECT_THAT(error_of([&] { t.load_state_dict(bad); }), HasSubstr("growth_tracker"));
  optim::GradScalerOptions o;
  o.backoff_factor = 1.0;
  EXPECT_THAT(error_of([&] { optim::GradScaler{o}; }), HasSubstr("backoff_factor"));
}

}  // namespace
}  // namespace loom
