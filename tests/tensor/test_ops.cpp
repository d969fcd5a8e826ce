// Tests of loom::ops (tensor/ops.h) on the CPU backend: every function against
// a reference loop written here in double precision, in f32 and f64, on
// contiguous and non-contiguous (transposed / sliced) operands, plus the errors
// promised for bad input.
//
// Relative error is ||x - ref|| / ||ref|| (2-norms; the plain norm of the
// difference where ref is all zeros). Inputs are fresh seeded random tensors at
// sizes that are not multiples of 8 or 16.
// Elementwise ops and reductions here; matmul / linear / softmax in test_ops_matmul.cpp;
// cat, the errors, bf16 / f16 on the CPU and 0-d dims in test_ops_errors.cpp.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "tensor/backend.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tensor/tensor.h"
#include "tests/test_helpers.h"

namespace {

using loom::Device;
using loom::DType;
using loom::Generator;
using loom::Shape;
using loom::Tensor;
using testing::HasSubstr;
using loom::testing::error_of;
namespace ops = loom::ops;
using namespace loom::testing::opsref;  // tests/test_helpers.h

// ============================================================================
// Elementwise binary ops with broadcasting
// ============================================================================

struct BinaryCase {
  const char* name;
  Tensor (*fn)(const Tensor&, const Tensor&);
  double (*ref)(double, double);
  bool positive_rhs;  // keep the right operand away from zero (div)
  bool exact;         // result is exactly representable: compare bit for bit
};

const BinaryCase kBinaryCases[] = {
    {"add", ops::add, [](double a, double b) { return a + b; }, false, false},
    {"sub", ops::sub, [](double a, double b) { return a - b; }, false, false},
    {"mul", ops::mul, [](double a, double b) { return a * b; }, false, false},
    {"div", ops::div, [](double a, double b) { return a / b; }, true, false},
    {"maximum", ops::maximum, [](double a, double b) { return std::max(a, b); }, false, true},
    {"minimum", ops::minimum, [](double a, double b) { return std::min(a, b); }, false, true},
};

const std::pair<Shape, Shape> kBroadcastShapes[] = {
    {{3, 1, 5}, {4, 1}},    // -> [3, 4, 5]
    {{}, {6, 7}},           // 0-d with a matrix
    {{6, 7}, {}},           // matrix with 0-d
    {{2, 3, 5}, {2, 3, 5}}, // same shape
    {{5}, {4, 5}},          // vector with matrix
    {{4, 1, 7}, {1, 6, 1}}, // both broadcast
    {{7, 1}, {1, 9}},       // outer
    {{1}, {3, 1}},
};

TEST(OpsBinary, MatchReferenceWithBroadcastingOnAllLayouts) {
  Generator gen(1001);
  for (const BinaryCase& op : kBinaryCases) {
    for (const auto& [sa, sb] : kBroadcastShapes) {
      for (DType dt : kFloatTypes) {
        for (Layout la : kLayouts) {
          for (Layout lb : kLayouts) {
            SCOPED_TRACE(std::string(op.name) + " " + shape_str(sa) + " with " + shape_str(sb) + ", " +
                         trace(dt, la) + " / " + layout_name(lb));
            const Input a = make_input(sa, gen, dt, la);
            const Input b = op.positive_rhs ? make_input(sb, gen, dt, lb, 0.5, 2.0) : make_input(sb, gen, dt, lb);
            const Tensor y = op.fn(a.t, b.t);
            const Shape out = broadcast(sa, sb);
            ASSERT_EQ(y.shape(), out);
            EXPECT_EQ(y.dtype(), dt);
            std::vector<double> ref(size_t(numel(out)));
            for (int64_t i = 0; i < numel(out); ++i) {
              const auto oi = unravel(i, out);
              ref[size_t(i)] = op.ref(a.ref[size_t(broadcast_index(oi, sa))], b.ref[size_t(broadcast_index(oi, sb))]);
            }
            if (op.exact) {
              EXPECT_EQ(y.to_vector(), ref);
            } else {
              EXPECT_LT(rel_err(y.to_vector(), ref), tol(dt));
            }
          }
        }
      }
    }
  }
}

TEST(OpsBinary, ExpandedAndAliasedOperands) {
  Generator gen(1002);
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const Input x = make_input({5, 1, 3}, gen, dt, Layout::Contiguous);
    const Tensor xe = x.t.expand({2, 5, 4, 3});  // stride-0 dims passed in directly
    const Input y = make_input({2, 5, 4, 3}, gen, dt, Layout::Transposed);
    const Tensor s = ops::sub(xe, y.t);
    std::vector<double> ref(120);
    for (int64_t i = 0; i < 120; ++i)
      ref[size_t(i)] = x.ref[size_t(broadcast_index(unravel(i, {2, 5, 4, 3}), {5, 1, 3}))] - y.ref[size_t(i)];
    EXPECT_LT(rel_err(s.to_vector(), ref), tol(dt));

    const Tensor sq = ops::mul(y.t, y.t);  // both operands the same view
    std::vector<double> ref2(120);
    for (size_t i = 0; i < 120; ++i) ref2[i] = y.ref[i] * y.ref[i];
    EXPECT_LT(rel_err(sq.to_vector(), ref2), tol(dt));
  }
}

TEST(OpsBinary, MaximumAndMinimumPropagateNaN) {
  const Tensor a = Tensor::from_values({1.0, NAN, 3.0, NAN}, {4}, DType::F64);
  const Tensor b = Tensor::from_values({NAN, 2.0, 1.0, NAN}, {4}, DType::F64);
  for (const Tensor& r : {ops::maximum(a, b), ops::minimum(a, b)}) {
    const std::vector<double> v = r.to_vector();
    EXPECT_TRUE(std::isnan(v[0]));
    EXPECT_TRUE(std::isnan(v[1]));
    EXPECT_FALSE(std::isnan(v[2]));
    EXPECT_TRUE(std::isnan(v[3]));
  }
  EXPECT_EQ(ops::maximum(a, b).to_vector()[2], 3.0);
  EXPECT_EQ(ops::minimum(a, b).to_vector()[2], 1.0);
}

TEST(OpsBinary, LargeNonContiguousOperandsUseEveryThreadCorrectly) {
  // Above the CPU backend's parallel thresholds (2^15 elements).
  Generator gen(1003);
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const Input a = make_input({67, 251, 3}, gen, dt, Layout::Transposed);
    const Input b = make_input({251, 1}, gen, dt, Layout::Sliced);
    const Tensor y = ops::add(a.t, b.t);
    std::vector<double> ref(size_t(67 * 251 * 3));
    for (int64_t i = 0; i < numel({67, 251, 3}); ++i)
      ref[size_t(i)] = a.ref[size_t(i)] + b.ref[size_t(unravel(i, {67, 251, 3})[1])];
    EXPECT_LT(rel_err(y.to_vector(), ref), tol(dt));
  }
}

// ============================================================================
// Elementwise unary ops
// ============================================================================

double gelu_erf_ref(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double gelu_tanh_ref(double x) {
  const double c = std::sqrt(2.0 / M_PI);
  return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
}
double gelu_erf_grad_ref(double x) {
  return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
}
double gelu_tanh_grad_ref(double x) {
  const double c = std::sqrt(2.0 / M_PI);
  const double t = std::tanh(c * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x);
}

struct UnaryCase {
  const char* name;
  std::function<Tensor(const Tensor&)> fn;
  std::function<double(double)> ref;
  double lo, hi;  // input range
};

std::vector<UnaryCase> unary_cases() {
  return {
      {"neg", [](const Tensor& x) { return ops::neg(x); }, [](double x) { return -x; }, -3, 3},
      {"exp", [](const Tensor& x) { return ops::exp(x); }, [](double x) { return std::exp(x); }, -4, 4},
      {"log", [](const Tensor& x) { return ops::log(x); }, [](double x) { return std::log(x); }, 0.05, 6},
      {"sqrt", [](const Tensor& x) { return ops::sqrt(x); }, [](double x) { return std::sqrt(x); }, 0.01, 9},
      {"rsqrt", [](const Tensor& x) { return ops::rsqrt(x); }, [](double x) { return 1.0 / std::sqrt(x); }, 0.05, 9},
      {"tanh", [](const Tensor& x) { return ops::tanh(x); }, [](double x) { return std::tanh(x); }, -4, 4},
      {"sigmoid", [](const Tensor& x) { return ops::sigmoid(x); },
       [](double x) { return 1.0 / (1.0 + std::exp(-x)); }, -8, 8},
      {"relu", [](const Tensor& x) { return ops::relu(x); }, [](double x) { return x > 0 ? x : 0.0; }, -3, 3},
      {"step", [](const Tensor& x) { return ops::step(x); }, [](double x) { return x > 0 ? 1.0 : 0.0; }, -3, 3},
      {"gelu(erf)", [](const Tensor& x) { return ops::gelu(x); }, gelu_erf_ref, -5, 5},
      {"gelu(tanh)", [](const Tensor& x) { return ops::gelu(x, true); }, gelu_tanh_ref, -5, 5},
      {"gelu_grad(erf)", [](const Tensor& x) { return ops::gelu_grad(x); }, gelu_erf_grad_ref, -5, 5},
      {"gelu_grad(tanh)", [](const Tensor& x) { return ops::gelu_grad(x, true); }, gelu_tanh_grad_ref, -5, 5},
      {"silu", [](const Tensor& x) { return ops::silu(x); }, [](double x) { return x / (1.0 + std::exp(-x)); }, -9, 9},
      {"silu_grad", [](const Tensor& x) { return ops::silu_grad(x); },
       [](double x) {
         const double s = 1.0 / (1.0 + std::exp(-x));
         return s + x * s * (1.0 - s);
       },
       -9, 9},
      {"abs", [](const Tensor& x) { return ops::abs(x); }, [](double x) { return std::abs(x); }, -3, 3},
      {"square", [](const Tensor& x) { return ops::square(x); }, [](double x) { return x * x; }, -3, 3},
      {"reciprocal", [](const Tensor& x) { return ops::reciprocal(x); }, [](double x) { return 1.0 / x; }, 0.2, 5},
      {"reciprocal(neg)", [](const Tensor& x) { return ops::reciprocal(x); }, [](double x) { return 1.0 / x; }, -5,
       -0.2},
      {"add_scalar", [](const Tensor& x) { return ops::add_scalar(x, 1.75); }, [](double x) { return x + 1.75; }, -3,
       3},
      {"mul_scalar", [](const Tensor& x) { return ops::mul_scalar(x, -2.5); }, [](double x) { return x * -2.5; }, -3,
       3},
      {"pow_scalar(3)", [](const Tensor& x) { return ops::pow_scalar(x, 3.0); }, [](double x) { return x * x * x; },
       -2, 2},
      {"pow_scalar(2) of negatives", [](const Tensor& x) { return ops::pow_scalar(x, 2.0); },
       [](double x) { return x * x; }, -3, -0.1},
      {"pow_scalar(0.5)", [](const Tensor& x) { return ops::pow_scalar(x, 0.5); },
       [](double x) { return std::sqrt(x); }, 0.01, 4},
      {"pow_scalar(-1.5)", [](const Tensor& x) { return ops::pow_scalar(x, -1.5); },
       [](double x) { return std::pow(x, -1.5); }, 0.2, 3},
  };
}

TEST(OpsUnary, MatchReferenceFormulasOnAllLayouts) {
  Generator gen(2001);
  for (const UnaryCase& op : unary_cases()) {
    for (const Shape& shape : {Shape{37}, Shape{5, 7, 3}, Shape{}, Shape{11, 13}}) {
      for (DType dt : kFloatTypes) {
        for (Layout la : kLayouts) {
          SCOPED_TRACE(std::string(op.name) + " " + shape_str(shape) + ", " + trace(dt, la));
          const Input x = make_input(shape, gen, dt, la, op.lo, op.hi);
          const Tensor y = op.fn(x.t);
          ASSERT_EQ(y.shape(), shape);
          EXPECT_EQ(y.dtype(), dt);
          std::vector<double> ref(x.ref.size());
          for (size_t i = 0; i < ref.size(); ++i) ref[i] = op.ref(x.ref[i]);
          // f32 transcendental functions carry a few ulps; 1e-6 keeps them honest
          EXPECT_LT(scaled_err(y.to_vector(), ref), tol(dt));
          // the input is not modified
          EXPECT_EQ(x.t.to_vector(), x.ref);
        }
      }
    }
  }
}

TEST(OpsUnary, ReluAndStepAtZeroAndTinyValues) {
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const Tensor x = Tensor::from_values({-1.0, 0.0, 2.0, -0.0, 1e-30, -1e-30}, {6}, dt);
    EXPECT_EQ(ops::step(x).to_vector(), (std::vector<double>{0, 0, 1, 0, 1, 0}));
    const std::vector<double> r = ops::relu(x).to_vector();
    EXPECT_EQ(r[0], 0.0);
    EXPECT_EQ(r[1], 0.0);
    EXPECT_EQ(r[2], 2.0);
    EXPECT_EQ(r[4], double(dt == DType::F32 ? double(1e-30f) : 1e-30));
    EXPECT_EQ(r[5], 0.0);
  }
}

TEST(OpsUnary, SigmoidAndTanhStayFiniteForLargeMagnitudes) {
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const std::vector<double> xs{-1000, -100, -50, -20, 0, 20, 50, 100, 1000};
    const Tensor x = Tensor::from_values(xs, {9}, dt);
    const std::vector<double> s = ops::sigmoid(x).to_vector();
    const std::vector<double> t = ops::tanh(x).to_vector();
    ASSERT_TRUE(all_finite(s));
    ASSERT_TRUE(all_finite(t));
    for (size_t i = 0; i < xs.size(); ++i) {
      const double ref = xs[i] >= 0 ? 1.0 / (1.0 + std::exp(-xs[i])) : std::exp(xs[i]) / (1.0 + std::exp(xs[i]));
      EXPECT_NEAR(s[i], ref, 1e-7 * std::max(1.0, ref)) << xs[i];
      EXPECT_GE(s[i], 0.0);
      EXPECT_LE(s[i], 1.0);
      EXPECT_NEAR(t[i], std::tanh(xs[i]), 1e-7);
    }
    // sigmoid(-50) is ~2e-22: relative accuracy, not just absolute
    EXPECT_NEAR(s[2] / std::exp(-50.0), 1.0, 1e-5);
  }
}

TEST(OpsUnary, GeluGradMatchesCentralDifferenceOfGeluInF64) {
  Generator gen(2002);
  for (bool tanh_approx : {false, true}) {
    SCOPED_TRACE(tanh_approx ? "tanh" : "erf");
    const Input x = make_input({101}, gen, DType::F64, Layout::Sliced, -6.0, 6.0);
    const double h = 1e-5;
    const std::vector<double> up = ops::gelu(ops::add_scalar(x.t, h), tanh_approx).to_vector();
    const std::vector<double> dn = ops::gelu(ops::add_scalar(x.t, -h), tanh_approx).to_vector();
    const std::vector<double> g = ops::gelu_grad(x.t, tanh_approx).to_vector();
    ASSERT_EQ(g.size(), 101u);
    for (size_t i = 0; i < g.size(); ++i) {
      const double fd = (up[i] - dn[i]) / (2 * h);
      EXPECT_NEAR(g[i], fd, 1e-8) << "x = " << x.ref[i];
    }
    // the two forms agree to about 1e-3 (the tanh approximation error)
    const std::vector<double> ge = ops::gelu(x.t, false).to_vector(), gt = ops::gelu(x.t, true).to_vector();
    for (size_t i = 0; i < ge.size(); ++i) EXPECT_NEAR(ge[i], gt[i], 2e-3);
  }
}

TEST(OpsUnary, LargeInputAboveParallelThreshold) {
  Generator gen(2003);
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const Input x = make_input({211, 173}, gen, dt, Layout::Transposed, -4, 4);
    const std::vector<double> y = ops::gelu(x.t).to_vector();
    std::vector<double> ref(x.ref.size());
    for (size_t i = 0; i < ref.size(); ++i) ref[i] = gelu_erf_ref(x.ref[i]);
    EXPECT_LT(rel_err(y, ref), tol(dt));
  }
}

// ============================================================================
// Reductions
// ============================================================================

enum class Red { Sum, Mean, Amax };

// Reference reduction of values `v` of `shape` over `dims` (sorted, unique),
// in keepdim layout.
std::vector<double> reduce_ref(Red op, const std::vector<double>& v, const Shape& shape,
                               const std::vector<int64_t>& dims) {
  Shape kept = shape;
  int64_t count = 1;
  for (int64_t d : dims) {
    kept[size_t(d)] = 1;
    count *= shape[size_t(d)];
  }
  std::vector<double> out(size_t(numel(kept)), op == Red::Amax ? -kInf : 0.0);
  for (int64_t i = 0; i < numel(shape); ++i) {
    std::vector<int64_t> idx = unravel(i, shape);
    for (int64_t d : dims) idx[size_t(d)] = 0;
    double& o = out[size_t(ravel(idx, kept))];
    if (op == Red::Amax) o = std::max(o, v[size_t(i)]);
    else o += v[size_t(i)];
  }
  if (op == Red::Mean)
    for (double& o : out) o /= double(count);
  return out;
}

TEST(OpsReduce, SumMeanAmaxOverDimSetsWithAndWithoutKeepdim) {
  Generator gen(3001);
  const Shape shape{3, 5, 7, 4};
  const std::vector<std::vector<int64_t>> dim_sets{
      {0}, {1}, {2}, {3}, {-1}, {-3}, {0, 2}, {1, 3}, {3, 0}, {0, 1, 3}, {-1, 1}, {0, 1, 2, 3}, {}, {1, 2}};
  for (Red op : {Red::Sum, Red::Mean, Red::Amax}) {
    const char* name = op == Red::Sum ? "sum" : op == Red::Mean ? "mean" : "amax";
    for (DType dt : kFloatTypes) {
      for (Layout la : kLayouts) {
        const Input x = make_input(shape, gen, dt, la);
        for (const auto& dims : dim_sets) {
          for (bool keepdim : {false, true}) {
            std::string ds;
            for (int64_t d : dims) ds += std::to_string(d) + " ";
            SCOPED_TRACE(std::string(name) + " dims {" + ds + "} keepdim " + (keepdim ? "1" : "0") + ", " +
                         trace(dt, la));
            std::vector<int64_t> norm;
            for (int64_t d : dims) norm.push_back(d < 0 ? d + 4 : d);
            if (norm.empty()) norm = {0, 1, 2, 3};
            std::sort(norm.begin(), norm.end());
            Shape expect_shape;
            for (int64_t d = 0; d < 4; ++d) {
              const bool red = std::find(norm.begin(), norm.end(), d) != norm.end();
              if (!red) expect_shape.push_back(shape[size_t(d)]);
              else if (keepdim) expect_shape.push_back(1);
            }
            const Tensor y = op == Red::Sum    ? ops::sum(x.t, dims, keepdim)
                             : op == Red::Mean ? ops::mean(x.t, dims, keepdim)
                                               : ops::amax(x.t, dims, keepdim);
            ASSERT_EQ(y.shape(), expect_shape);
            EXPECT_EQ(y.dtype(), dt);
            const std::vector<double> ref = reduce_ref(op, x.ref, shape, norm);
            if (op == Red::Amax) {
              EXPECT_EQ(y.to_vector(), ref);
            } else {
              EXPECT_LT(rel_err(y.to_vector(), ref), tol(dt));
            }
          }
        }
      }
    }
  }
}

TEST(OpsReduce, LargeReductionsAboveParallelThresholds) {
  Generator gen(3002);
  const Shape shape{3, 4099, 13};
  for (DType dt : kFloatTypes) {
    for (const std::vector<int64_t>& dims : {std::vector<int64_t>{1}, {2}, {0, 2}, {}, {0}}) {
      SCOPED_TRACE(std::string(loom::dtype_name(dt)) + " dims " + std::to_string(dims.size()));
      const Input x = make_input(shape, gen, dt, Layout::Sliced);
      std::vector<int64_t> norm = dims.empty() ? std::vector<int64_t>{0, 1, 2} : dims;
      EXPECT_LT(rel_err(ops::sum(x.t, dims).to_vector(), reduce_ref(Red::Sum, x.ref, shape, norm)), tol(dt));
      EXPECT_EQ(ops::amax(x.t, dims).to_vector(), reduce_ref(Red::Amax, x.ref, shape, norm));
    }
  }
}

TEST(OpsReduce, ZeroDimAndEmptyInputs) {
  const Tensor s = Tensor::scalar(2.5, DType::F64);
  EXPECT_EQ(ops::sum(s).shape(), Shape{});
  EXPECT_EQ(ops::sum(s).item(), 2.5);
  EXPECT_EQ(ops::amax(s).item(), 2.5);
  EXPECT_EQ(ops::mean(s).item(), 2.5);

  const Tensor e = Tensor::zeros({0, 3}, DType::F32);
  const Tensor se = ops::sum(e, {0});
  EXPECT_EQ(se.shape(), (Shape{3}));
  EXPECT_EQ(se.to_vector(), std::vector<double>(3, 0.0));
  EXPECT_EQ(ops::sum(e, {1}).shape(), (Shape{0}));
  EXPECT_THAT(error_of([&] { ops::amax(e, {0}); }), HasSubstr("amax"));
  EXPECT_THAT(error_of([&] { ops::mean(e, {0}); }), HasSubstr("mean"));
}

TEST(OpsReduce, AmaxPropagatesNaNAndHandlesInfinity) {
  const Tensor x = Tensor::from_values({1, NAN, 3, -kInf, -kInf, -kInf, kInf, 2, 0}, {3, 3}, DType::F64);
  const std::vector<double> r = ops::amax(x, {1}).to_vector();
  EXPECT_TRUE(std::isnan(r[0]));
  EXPECT_EQ(r[1], -kInf);
  EXPECT_EQ(r[2], kInf);
  const std::vector<double> c = ops::amax(x, {0}).to_vector();
  EXPECT_EQ(c[0], kInf);
  EXPECT_TRUE(std::isnan(c[1]));
  EXPECT_EQ(c[2], 3.0);
}

TEST(OpsReduce, ReductionDimsNormalisesSortsAndChecks) {
  EXPECT_EQ(ops::reduction_dims({-1, 0}, 3, "t"), (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(ops::reduction_dims({}, 3, "t"), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(ops::reduction_dims({2, -3, 1}, 3, "t"), (std::vector<int64_t>{0, 1, 2}));
  EXPECT_THAT(error_of([] { ops::reduction_dims({1, -2}, 3, "myop"); }), HasSubstr("repeated"));
  EXPECT_THAT(error_of([] { ops::reduction_dims({1, -2}, 3, "myop"); }), HasSubstr("myop"));
  EXPECT_THAT(error_of([] { ops::reduction_dims({3}, 3, "myop"); }), HasSubstr("out of range"));
}

TEST(OpsReduce, SumToUnbroadcastsToEveryCompatibleShape) {
  Generator gen(3003);
  const Shape xs{3, 4, 5};
  const std::vector<Shape> targets{{4, 1}, {1, 5}, {5}, {3, 1, 1}, {}, {1, 1, 1}, {4, 5}, {1}, {3, 4, 1}, {1, 4, 5}};
  for (DType dt : kFloatTypes) {
    for (Layout la : kLayouts) {
      const Input x = make_input(xs, gen, dt, la);
      for (const Shape& target : targets) {
        SCOPED_TRACE(shape_str(target) + ", " + trace(dt, la));
        const Tensor y = ops::sum_to(x.t, target);
        ASSERT_EQ(y.shape(), target);
        std::vector<double> ref(size_t(numel(target)), 0.0);
        for (int64_t i = 0; i < numel(xs); ++i) ref[size_t(broadcast_index(unravel(i, xs), target))] += x.ref[size_t(i)];
        EXPECT_LT(rel_err(y.to_vector(), ref), tol(dt));
      }
      const Tensor same = ops::sum_to(x.t, xs);
      EXPECT_EQ(same.shape(), xs);
      EXPECT_EQ(same.to_vector(), x.ref);
    }
  }
  const Tensor x = Tensor::zeros(xs);
  EXPECT_THAT(error_of([&] { ops::sum_to(x, {2, 5}); }), HasSubstr("sum_to"));
  EXPECT_THAT(error_of([&] { ops::sum_to(x, {4}); }), HasSubstr("sum_to"));
  EXPECT_THAT(error_of([&] { ops::sum_to(x, {2, 3, 4, 5}); }), HasSubstr("sum_to"));
}

// (with the binary cases above; the other errors are in test_ops_errors.cpp)
TEST(OpsErrors, EveryBinaryOpNamesItselfOnShapeMismatch) {
  const Tensor a = Tensor::zeros({3, 5}), b = Tensor::zeros({2, 1, 4});
  for (const BinaryCase& op : kBinaryCases) {
    SCOPED_TRACE(op.name);
    const std::string msg = error_of([&] { op.fn(a, b); });
    EXPECT_THAT(msg, HasSubstr(op.name));
    EXPECT_THAT(msg, HasSubstr("[3, 5]"));
    EXPECT_THAT(msg, HasSubstr("[2, 1, 4]"));
  }
}

}  // namespace
