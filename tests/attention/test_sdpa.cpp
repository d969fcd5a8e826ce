// Attention backends and the dispatcher (ctest -L attention): flash and sliced
// against math, forward and every input gradient, on fresh random inputs.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <omp.h>

#include <cmath>
#include <cstdlib>

#include "attention/sdpa.h"
#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "tensor/ops.h"
#include "tensor/backend.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::attention {
namespace {

using loom::testing::error_of;
using loom::testing::rel_error;
using ::testing::HasSubstr;

uint64_t fresh_seed() { return ::testing::UnitTest::GetInstance()->random_seed() * 1000003ull + std::rand(); }

struct Case {
  int64_t batch, heads, q, k, d;
  enum MaskKind { None, PerKey, PerQuery, Causal } mask;
};

struct Outputs {
  Tensor out, dq, dk, dv;
};

// Runs one backend on the given inputs: output and all three input gradients.
Outputs run(BackendKind kind, const Tensor& q, const Tensor& k, const Tensor& v, const SdpaOptions& base,
            const Tensor& upstream) {
  Variable vq(q.clone(), true), vk(k.clone(), true), vv(v.clone(), true);
  SdpaOptions o = base;
  o.backend = kind;
  Variable out = scaled_dot_product_attention(vq, vk, vv, o);
  out.backward(upstream);
  return {out.tensor(), vq.grad(), vk.grad(), vv.grad()};
}

void compare_backends(const Case& c, DType dtype, BackendKind kind, double tol, int64_t slice_size = 0) {
  Generator gen(fresh_seed());
  const int64_t n = c.batch * c.heads;
  const Tensor q = Tensor::randn({n, c.q, c.d}, gen, dtype), k = Tensor::randn({n, c.k, c.d}, gen, dtype);
  const Tensor v = Tensor::randn({n, c.k, c.d}, gen, dtype);
  SdpaOptions o;
  o.heads = c.heads;
  o.scale = 1.0 / std::sqrt(double(c.d));
  o.slice_size = slice_size;
  if (c.mask == Case::PerKey) o.mask = Tensor::randn({c.batch, 1, c.k}, gen, dtype, Device::cpu(), 0.0, 3.0);
  if (c.mask == Case::PerQuery) o.mask = Tensor::randn({c.batch, c.q, c.k}, gen, dtype, Device::cpu(), 0.0, 3.0);
  if (c.mask == Case::Causal) o.causal = true;
  const Tensor up = Tensor::randn({n, c.q, c.d}, gen, dtype);
  const Outputs got = run(kind, q, k, v, o, up);
  const std::string what = std::string(backend_name(kind)) + " Q=" + std::to_string(c.q) + " K=" +
                           std::to_string(c.k) + " d=" + std::to_string(c.d) + " mask=" + std::to_string(c.mask);
  if (dtype == DType::F64) {
    const Outputs ref = run(BackendKind::Math, q, k, v, o, up);
    EXPECT_LE(rel_error(got.out, ref.out), tol) << what << " out";
    EXPECT_LE(rel_error(got.dq, ref.dq), tol) << what << " dq";
    EXPECT_LE(rel_error(got.dk, ref.dk), tol) << what << " dk";
    EXPECT_LE(rel_error(got.dv, ref.dv), tol) << what << " dv";
    return;
  }
  // Below f64 both backends are measured against the math backend in f64 on the same (rounded)
  // inputs. The bound is tol, or twice the math backend's own error where the draw is worse
  // conditioned than that (a per-key mask of std 3 made f32 gradients err by 1.3e-5 once).
  SdpaOptions o64 = o;
  if (o.mask.defined()) o64.mask = o.mask.to(DType::F64);
  const auto f64 = [](const Tensor& t) { return t.to(DType::F64); };
  const Outputs ref = run(BackendKind::Math, f64(q), f64(k), f64(v), o64, f64(up));
  const Outputs same_dtype = run(BackendKind::Math, q, k, v, o, up);
  const auto check = [&](const Tensor& g, const Tensor& r, const Tensor& m, const char* name) {
    const double bound = std::max(tol, 2 * rel_error(m, r));
    EXPECT_LE(rel_error(g, r), bound) << what << " " << name << " (math in " << dtype_name(dtype) << ": "
                                      << rel_error(m, r) << ")";
  };
  check(got.out, ref.out, same_dtype.out, "out");
  check(got.dq, ref.dq, same_dtype.dq, "dq");
  check(got.dk, ref.dk, same_dtype.dk, "dk");
  check(got.dv, ref.dv, same_dtype.dv, "dv");
}

class FlashVsMath : public ::testing::TestWithParam<int64_t> {};  // head dim

TEST_P(FlashVsMath, F64AllLengthsAndMasks) {
  const int64_t d = GetParam();
  for (int64_t q : {1, 7, 77, 128, 333})
    for (int64_t k : {1, 7, 77, 128, 333}) {
      const Case::MaskKind mask = Case::MaskKind((q + k + d) % 4);
      compare_backends({2, 2, q, k, d, mask}, DType::F64, BackendKind::Flash, 1e-10);
    }
}

TEST_P(FlashVsMath, F32WithMasks) {
  const int64_t d = GetParam();
  for (Case::MaskKind mask : {Case::None, Case::PerKey, Case::PerQuery, Case::Causal})
    compare_backends({2, 3, 77, 333, d, mask}, DType::F32, BackendKind::Flash, 1e-5);
  compare_backends({1, 2, 333, 77, d, Case::PerKey}, DType::F32, BackendKind::Flash, 1e-5);  // cross-attention K = 77
}

// The flash backward has two schedules: one pass per row when rows ≥ threads, and
// separate key and query passes when there are fewer rows than threads.
TEST(FlashVsMath, BothBackwardSchedules) {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 3, 8}) {
    omp_set_num_threads(threads);
    for (Case::MaskKind mask : {Case::None, Case::PerQuery, Case::Causal}) {
      compare_backends({1, 1, 130, 200, 64, mask}, DType::F64, BackendKind::Flash, 1e-10);
      compare_backends({1, 2, 77, 129, 40, mask}, DType::F64, BackendKind::Flash, 1e-10);
      compare_backends({1, 2, 200, 77, 72, mask}, DType::F32, BackendKind::Flash, 1e-5);
    }
  }
  omp_set_num_threads(saved);
}

INSTANTIATE_TEST_SUITE_P(HeadDims, FlashVsMath, ::testing::Values(40, 64, 72, 80, 96, 128, 160),
                         [](const ::testing::TestParamInfo<int64_t>& i) { return "d" + std::to_string(i.param); });

TEST(SlicedVsMath, SameNumbersIncludingTheRemainderRows) {
  for (int64_t slice : {1, 3, 5})  // 2·3 = 6 rows: slices of 5 leave a remainder of 1
    for (Case::MaskKind mask : {Case::None, Case::PerKey, Case::PerQuery, Case::Causal}) {
      compare_backends({2, 3, 33, 77, 40, mask}, DType::F64, BackendKind::Sliced, 1e-10, slice);
      compare_backends({2, 3, 33, 77, 40, mask}, DType::F32, BackendKind::Sliced, 1e-5, slice);
    }
}

TEST(Flash, FullyMaskedRowGivesTheUnmaskedSoftmaxNotNaN) {
  // A keep-mask of all zeros becomes a bias of −10000 on every key: the softmax is
  // that of the unmasked row (exactly so in f64; within f32's resolution at 10⁴ in f32).
  for (const auto& [dtype, tol] : {std::pair{DType::F64, 1e-10}, std::pair{DType::F32, 1e-3}}) {
    Generator gen(fresh_seed());
    const Tensor q = Tensor::randn({2, 5, 8}, gen, dtype), k = Tensor::randn({2, 9, 8}, gen, dtype);
    const Tensor v = Tensor::randn({2, 9, 8}, gen, dtype);
    SdpaOptions masked;
    masked.mask = Tensor::full({2, 1, 9}, -10000.0, dtype);
    for (BackendKind kind : {BackendKind::Flash, BackendKind::Math, BackendKind::Sliced}) {
      masked.backend = kind;
      SdpaOptions plain = masked;
      plain.mask = Tensor();
      const Tensor a = scaled_dot_product_attention(Variable(q), Variable(k), Variable(v), masked).tensor();
      const Tensor b = scaled_dot_product_attention(Variable(q), Variable(k), Variable(v), plain).tensor();
      for (double x : a.to_vector()) ASSERT_TRUE(std::isfinite(x)) << backend_name(kind);
      EXPECT_LE(rel_error(a, b), tol) << backend_name(kind) << " " << dtype;
    }
  }
}

TEST(Flash, GradcheckF64) {
  Generator gen(fresh_seed());
  for (BackendKind kind : {BackendKind::Flash, BackendKind::Math, BackendKind::Sliced}) {
    Variable q(Tensor::randn({2, 3, 4}, gen, DType::F64), true), k(Tensor::randn({2, 5, 4}, gen, DType::F64), true);
    Variable v(Tensor::randn({2, 5, 3}, gen, DType::F64), true);
    SdpaOptions o;
    o.heads = 2, o.scale = 0.5, o.backend = kind, o.slice_size = 1;
    o.mask = Tensor::randn({1, 3, 5}, gen, DType::F64);
    const GradcheckResult r =
        gradcheck([&](const std::vector<Variable>& x) { return scaled_dot_product_attention(x[0], x[1], x[2], o); },
                  {q, k, v});
    EXPECT_TRUE(r.ok) << backend_name(kind) << ": " << r.message;
  }
}

// ---- dispatcher ------------------------------------------------------------------------

TEST(Dispatcher, ScopedOverrideWinsAndRestores) {
  const BackendKind before = resolve_backend();
  {
    ScopedAttentionBackend outer(BackendKind::Math);
    EXPECT_EQ(resolve_backend(BackendKind::Flash), BackendKind::Math);
    {
      ScopedAttentionBackend inner(BackendKind::Sliced);
      EXPECT_EQ(resolve_backend(), BackendKind::Sliced);
    }
    EXPECT_EQ(resolve_backend(), BackendKind::Math);
  }
  EXPECT_EQ(resolve_backend(), before);
  EXPECT_EQ(resolve_backend(BackendKind::Sliced), BackendKind::Sliced);  // the per-layer override
}

TEST(Dispatcher, DefaultIsAutoOrTheEnvironmentChoice) {
  const char* env = std::getenv("LOOM_ATTENTION_BACKEND");
  EXPECT_EQ(default_backend(), env && *env ? parse_backend(env) : BackendKind::Auto);
  const BackendKind saved = default_backend();
  set_default_backend(BackendKind::Sliced);
  EXPECT_EQ(resolve_backend(), BackendKind::Sliced);
  set_default_backend(saved);
}

TEST(Dispatcher, UnknownBackendNameIsAnError) {
  EXPECT_THAT(error_of([] { parse_backend("fast", "LOOM_ATTENTION_BACKEND"); }),
              HasSubstr("unknown attention backend 'fast'"));
}

class DispatcherChecks : public ::testing::Test {
 protected:
  Variable q{Tensor::zeros({4, 3, 8})}, k{Tensor::zeros({4, 5, 8})}, v{Tensor::zeros({4, 5, 6})};
  SdpaOptions o;
  std::string call(const Variable& a, const Variable& b, const Variable& c) {
    return error_of([&] { scaled_dot_product_attention(a, b, c, o); });
  }
};

TEST_F(DispatcherChecks, DtypeMismatch) {
  EXPECT_THAT(call(q, Variable(Tensor::zeros({4, 5, 8}, DType::F64)), v), HasSubstr("dtypes differ"));
}
TEST_F(DispatcherChecks, HeadDimMismatch) {
  EXPECT_THAT(call(q, Variable(Tensor::zeros({4, 5, 7})), v), HasSubstr("q.d != k.d"));
}
TEST_F(DispatcherChecks, KeyLengthMismatch) {
  EXPECT_THAT(call(q, k, Variable(Tensor::zeros({4, 6, 6}))), HasSubstr("k.len != v.len"));
}
TEST_F(DispatcherChecks, MaskLastDimMustBeK) {
  o.mask = Tensor::zeros({1, 1, 6});
  EXPECT_THAT(call(q, k, v), HasSubstr("mask.last != K"));
}
TEST_F(DispatcherChecks, MaskAndCausalNotBoth) {
  o.mask = Tensor::zeros({1, 1, 5});
  o.causal = true;
  EXPECT_THAT(call(q, k, v), HasSubstr("mask and causal"));
}
TEST_F(DispatcherChecks, DeviceMismatch) {
  if (cuda_available()) {
    EXPECT_THAT(call(q, Variable(Tensor::zeros({4, 5, 8}, DType::F32, Device::cuda(0))), v),
                HasSubstr("different devices"));
  } else {
    EXPECT_THAT(error_of([] { Tensor::zeros({1}, DType::F32, Device::cuda(0)); }), HasSubstr("cuda:0"));
  }
}
TEST_F(DispatcherChecks, FlashNamesAnUnsupportedDtype) {
  o.backend = BackendKind::Flash;
  const Variable h(Tensor::zeros({4, 3, 8}, DType::I64));
  EXPECT_THAT(call(h, Variable(Tensor::zeros({4, 5, 8}, DType::I64)), Variable(Tensor::zeros({4, 5, 6}, DType::I64))),
              HasSubstr("attention backend 'flash' does not support dtype i64"));
}
// bf16 storage on the CPU is computed in f32: the result is the f32 result rounded to bf16.
TEST(FlashCpu, Bf16StorageComputesInF32) {
  Generator gen(5);
  const Tensor q = Tensor::randn({3, 17, 40}, gen), k = Tensor::randn({3, 77, 40}, gen), v = Tensor::randn({3, 77, 40}, gen);
  SdpaOptions o;
  o.scale = 1.0 / std::sqrt(40.0);
  o.backend = BackendKind::Flash;
  auto run = [&](DType t) {
    return scaled_dot_product_attention(Variable(q.to(t)), Variable(k.to(t)), Variable(v.to(t)), o).tensor();
  };
  const Tensor ref = run(DType::F32);
  const Tensor half = run(DType::BF16);
  EXPECT_EQ(half.dtype(), DType::BF16);
  const Tensor from_bf16_inputs = scaled_dot_product_attention(Variable(q.to(DType::BF16).to(DType::F32)),
      Variable(k.to(DType::BF16).to(DType::F32)), Variable(v.to(DType::BF16).to(DType::F32)), o).tensor();
  EXPECT_EQ(half.to(DType::F32).to_vector(), from_bf16_inputs.to(DType::BF16).to(DType::F32).to_vector());
  const std::vector<double> a = half.to(DType::F32).to_vector(), b = ref.to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
  EXPECT_LE(std::sqrt(num / den), 2e-2);
}
// Auto takes flash on the CPU for every float dtype.
TEST(FlashCpu, AutoPicksFlashOnTheCpu) {
  Generator gen(6);
  for (DType t : {DType::F32, DType::F64, DType::BF16})
    EXPECT_EQ(auto_backend(Tensor::randn({2, 3, 8}, gen, t), Tensor::randn({2, 5, 8}, gen, t),
                           Tensor::randn({2, 5, 8}, gen, t), Tensor(), 1), BackendKind::Flash);
}
TEST_F(DispatcherChecks, ScanningChecksFindNaN) {
  const bool before = scanning_checks_enabled();
  set_scanning_checks(true);
  Variable bad(Tensor::full({4, 3, 8}, NAN));
  EXPECT_THAT(call(bad, k, v), HasSubstr("q [4, 3, 8] contains NaN"));
  set_scanning_checks(before);
}

}  // namespace
}  // namespace loom::attention
