// Tests of seeded random tensors and the Generator's state, Device parsing, and errors for CUDA tensors without a GPU.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "tensor/backend.h"
#include "tensor/device.h"
#include "tensor/dtype.h"
#include "tensor/error.h"
#include "tensor/random.h"
#include "tensor/tensor.h"
#include "tests/test_helpers.h"

namespace {

using loom::Device;
using loom::DType;
using loom::Generator;
using loom::Tensor;
using testing::HasSubstr;
using loom::testing::error_of;

// ============================================================================
// Random numbers
// ============================================================================

TEST(TensorRandom, SameSeedGivesTheSameNumbers) {
  Generator g1(1234), g2(1234);
  const Tensor a = Tensor::randn({17, 13}, g1, DType::F64);
  const Tensor b = Tensor::randn({17, 13}, g2, DType::F64);
  EXPECT_EQ(a.to_vector(), b.to_vector());
  const Tensor c = Tensor::rand({31}, g1, DType::F32, Device::cpu(), -1.0, 2.0);
  const Tensor d = Tensor::rand({31}, g2, DType::F32, Device::cpu(), -1.0, 2.0);
  EXPECT_EQ(c.to_vector(), d.to_vector());
  // a generator keeps moving: the next draw differs from the first
  EXPECT_NE(Tensor::randn({17, 13}, g1, DType::F64).to_vector(), a.to_vector());

  Generator g3(99);
  const uint64_t first = g3.next_u64();
  g3.next_u64();
  g3.manual_seed(99);
  EXPECT_EQ(g3.next_u64(), first);
}

TEST(TensorRandom, DifferentSeedsGiveDifferentNumbers) {
  Generator g1(1), g2(2);
  const std::vector<double> a = Tensor::randn({1001}, g1, DType::F64).to_vector();
  const std::vector<double> b = Tensor::randn({1001}, g2, DType::F64).to_vector();
  int differ = 0;
  for (size_t i = 0; i < a.size(); ++i) differ += a[i] != b[i];
  EXPECT_GT(differ, 990);
}

TEST(TensorRandom, NumbersDependOnlyOnTheGeneratorStream) {
  // Two draws of 7 and 13 normals continue the stream of one draw of 20,
  // and the f32 tensor holds the f64 numbers rounded to f32.
  Generator g1(77), g2(77), g3(77);
  std::vector<double> split = Tensor::randn({7}, g1, DType::F64).to_vector();
  const std::vector<double> rest = Tensor::randn({13}, g1, DType::F64).to_vector();
  split.insert(split.end(), rest.begin(), rest.end());
  const std::vector<double> whole = Tensor::randn({20}, g2, DType::F64).to_vector();
  EXPECT_EQ(split, whole);
  const std::vector<double> f = Tensor::randn({4, 5}, g3, DType::F32).to_vector();
  for (size_t i = 0; i < 20; ++i) EXPECT_EQ(f[i], double(float(whole[i])));
}

TEST(TensorRandom, DefaultGeneratorIsReseededByManualSeed) {
  loom::manual_seed(2024);
  const double a = loom::default_generator().normal();
  const uint64_t b = loom::default_generator().next_u64();
  loom::manual_seed(2024);
  EXPECT_EQ(loom::default_generator().normal(), a);
  EXPECT_EQ(loom::default_generator().next_u64(), b);
}

TEST(TensorRandom, RandnHasPlausibleMeanAndStd) {
  Generator gen(31337);
  for (auto [mu, sigma] : {std::pair<double, double>{0.0, 1.0}, {3.0, 2.0}, {-1.5, 0.25}}) {
    SCOPED_TRACE("mean " + std::to_string(mu) + " std " + std::to_string(sigma));
    const std::vector<double> v = Tensor::randn({10007}, gen, DType::F64, Device::cpu(), mu, sigma).to_vector();
    double s = 0.0, s2 = 0.0;
    int within1 = 0;
    for (double x : v) s += x;
    const double mean = s / double(v.size());
    for (double x : v) {
      s2 += (x - mean) * (x - mean);
      within1 += std::abs(x - mu) < sigma;
    }
    const double sd = std::sqrt(s2 / double(v.size() - 1));
    EXPECT_NEAR(mean, mu, 0.05 * sigma);
    EXPECT_NEAR(sd, sigma, 0.05 * sigma);
    EXPECT_NEAR(double(within1) / double(v.size()), 0.6827, 0.03);
  }
}

TEST(TensorRandom, RandIsUniformWithinLowHigh) {
  Generator gen(4242);
  for (DType dt : {DType::F32, DType::F64}) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const double low = -2.0, high = 3.0;
    const std::vector<double> v = Tensor::rand({10007}, gen, dt, Device::cpu(), low, high).to_vector();
    double mn = 1e300, mx = -1e300, s = 0.0;
    int below_half = 0;
    for (double x : v) {
      mn = std::min(mn, x);
      mx = std::max(mx, x);
      s += x;
      below_half += x < 0.5;
    }
    EXPECT_GE(mn, low);
    EXPECT_LT(mx, high);
    EXPECT_LT(mn, low + 0.01);
    EXPECT_GT(mx, high - 0.01);
    EXPECT_NEAR(s / double(v.size()), 0.5, 0.05);
    EXPECT_NEAR(double(below_half) / double(v.size()), 0.5, 0.03);
  }
}

// rand promises values in [low, high); converting a uniform double close to
// `high` to a narrower dtype must not round it up to `high`.
TEST(TensorRandom, RandNeverReturnsHighAfterRoundingToF32) {
  // Seed 3718 draws a uniform double >= 1 - 2^-25 within its first 4099
  // numbers (checked below), which rounds to 1.0f.
  Generator probe(3718);
  double umax = 0.0;
  for (int i = 0; i < 4099; ++i) umax = std::max(umax, probe.uniform());
  ASSERT_EQ(float(umax), 1.0f) << "generator changed; the seed no longer exercises the rounding case";
  Generator gen(3718);
  const std::vector<double> v = Tensor::rand({4099}, gen, DType::F32).to_vector();
  double mx = 0.0;
  for (double x : v) mx = std::max(mx, x);
  EXPECT_LT(mx, 1.0) << "Tensor::rand(f32) returned high (1.0)";
}

TEST(TensorRandom, RandNeverReturnsHighInBf16OrF16) {
  for (DType dt : {DType::BF16, DType::F16}) {
    SCOPED_TRACE(loom::dtype_name(dt));
    Generator gen(555);
    const std::vector<double> v = Tensor::rand({40009}, gen, dt).to_vector();
    int at_high = 0;
    double mn = 1.0;
    for (double x : v) {
      at_high += x >= 1.0;
      mn = std::min(mn, x);
    }
    EXPECT_GE(mn, 0.0);
    EXPECT_EQ(at_high, 0) << at_high << " of " << v.size() << " values equal high (1.0)";
  }
}

// ============================================================================
// Devices
// ============================================================================

TEST(DeviceParse, AcceptsCpuCudaAndCudaN) {
  EXPECT_EQ(Device::parse("cpu"), Device::cpu());
  EXPECT_TRUE(Device::parse("cpu").is_cpu());
  const Device c = Device::parse("cuda");
  EXPECT_TRUE(c.is_cuda());
  EXPECT_EQ(c.index, 0);
  const Device c3 = Device::parse("cuda:3");
  EXPECT_TRUE(c3.is_cuda());
  EXPECT_EQ(c3.index, 3);
  EXPECT_EQ(Device::parse("cuda:12").index, 12);
  EXPECT_EQ(c3.str(), "cuda:3");
  EXPECT_EQ(Device::cpu().str(), "cpu");
  EXPECT_EQ(Device::parse(Device::cuda(7).str()), Device::cuda(7));
}

TEST(DeviceParse, EqualityComparesTypeAndCudaIndex) {
  EXPECT_EQ(Device::cuda(1), Device::cuda(1));
  EXPECT_NE(Device::cuda(0), Device::cuda(1));
  EXPECT_NE(Device::cpu(), Device::cuda(0));
}

TEST(DeviceParse, BadStringsThrow) {
  for (const char* s : {"", "gpu", "CPU", "cuda:", "cuda:x", "cuda:-1", "cuda3", " cpu", "cuda:1a", "cpu:0",
                        "cuda:99999"}) {
    SCOPED_TRACE(std::string("'") + s + "'");
    EXPECT_THAT(error_of([&] { Device::parse(s); }), HasSubstr("Device::parse"));
  }
  EXPECT_THAT(error_of([] { Device::parse("tpu"); }), HasSubstr("'tpu'"));
}

TEST(DeviceCuda, CudaTensorWithoutAGpuThrowsMentioningCuda) {
  if (loom::cuda_available()) GTEST_SKIP() << "a CUDA device is present; this checks the no-GPU error";
  EXPECT_EQ(loom::cuda_device_count(), 0);
  EXPECT_THAT(error_of([] { Tensor::empty({2}, DType::F32, Device::cuda(0)); }), HasSubstr("cuda"));
  EXPECT_THAT(error_of([] { Tensor::zeros({2, 3}, DType::F64, Device::cuda(1)); }), HasSubstr("cuda:1"));
  EXPECT_THAT(error_of([] { Tensor::from_values({1, 2}, {2}, DType::F32, Device::cuda(0)); }),
              HasSubstr("cuda"));
  EXPECT_THAT(error_of([] { Tensor::ones({3}).to(Device::cuda(0)); }), HasSubstr("cuda"));
}

}  // namespace

TEST(TensorRandomState, SavedStateResumesTheExactStream) {
  loom::Generator g(77);
  g.normal();  // leaves a cached spare normal
  const std::vector<uint64_t> saved = g.state();
  std::vector<double> a;
  for (int i = 0; i < 5; ++i) a.push_back(g.normal()), a.push_back(g.uniform());
  loom::Generator h(1);
  h.set_state(saved);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(h.normal(), a[size_t(2 * i)]);
    EXPECT_EQ(h.uniform(), a[size_t(2 * i + 1)]);
  }
  EXPECT_THROW(h.set_state({1, 2, 3}), loom::Error);
}
