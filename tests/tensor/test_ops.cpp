// Tests of loom::ops (tensor/ops.h) on the CPU backend: every function against
// a reference loop written here in double precision, in f32 and f64, on
// contiguous and non-contiguous (transposed / sliced) operands, plus the errors
// promised for bad input.
//
// Relative error is ||x - ref|| / ||ref|| (2-norms; the plain norm of the
// difference where ref is all zeros). Inputs are fresh seeded random tensors at
// sizes that are not multiples of 8 or 16.
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

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- helpers -------------------------------------------------------------------------

#define LOOM_EXPECT_CHILD_EXITS_0(body)             \
  do {                                               \
    GTEST_FLAG_SET(death_test_style, "threadsafe"); \
    EXPECT_EXIT(body, ::testing::ExitedWithCode(0), ""); \
  } while (0)

int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::vector<int64_t> unravel(int64_t i, const Shape& shape) {
  std::vector<int64_t> idx(shape.size());
  for (int64_t d = int64_t(shape.size()) - 1; d >= 0; --d) {
    idx[size_t(d)] = i % shape[size_t(d)];
    i /= shape[size_t(d)];
  }
  return idx;
}

int64_t ravel(const std::vector<int64_t>& idx, const Shape& shape) {
  int64_t i = 0;
  for (size_t d = 0; d < shape.size(); ++d) i = i * shape[d] + idx[d];
  return i;
}

std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// NumPy broadcast of two shapes (the test's own version).
Shape broadcast(const Shape& a, const Shape& b) {
  const size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    const int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    out[i] = da == 1 ? db : da;
  }
  return out;
}

// Index into a tensor of `shape` that broadcasts to `out` at out-index `oi`.
int64_t broadcast_index(const std::vector<int64_t>& oi, const Shape& shape) {
  const size_t lead = oi.size() - shape.size();
  std::vector<int64_t> idx(shape.size());
  for (size_t d = 0; d < shape.size(); ++d) idx[d] = shape[d] == 1 ? 0 : oi[lead + d];
  return ravel(idx, shape);
}

double rel_err(const std::vector<double>& x, const std::vector<double>& ref) {
  EXPECT_EQ(x.size(), ref.size());
  if (x.size() != ref.size()) return kInf;
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    num += (x[i] - ref[i]) * (x[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  if (std::isnan(num)) return kInf;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Like rel_err, but with ||ref|| floored at sqrt(n) (an RMS of 1): for functions
// evaluated near one of their roots (gelu_grad, log near 1, tanh near 0) the
// absolute rounding error of f32 is ~eps·O(1) however small the value is.
double scaled_err(const std::vector<double>& x, const std::vector<double>& ref) {
  double den = 0.0;
  for (double r : ref) den += r * r;
  const double floor = std::sqrt(double(ref.size()));
  const double re = rel_err(x, ref);
  return den > 0 ? re * std::sqrt(den) / std::max(std::sqrt(den), floor) : re / std::max(floor, 1.0);
}

bool all_finite(const std::vector<double>& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isfinite(x); });
}

// Tolerances for elementwise ops / reductions / softmax; matmul uses its own.
double tol(DType dt) { return dt == DType::F64 ? 1e-12 : 1e-6; }

enum class Layout { Contiguous, Transposed, Sliced };
const Layout kLayouts[] = {Layout::Contiguous, Layout::Transposed, Layout::Sliced};
const DType kFloatTypes[] = {DType::F32, DType::F64};

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::Contiguous: return "contiguous";
    case Layout::Transposed: return "transposed";
    case Layout::Sliced: return "sliced";
  }
  return "?";
}

std::string trace(DType dt, Layout la) { return std::string(loom::dtype_name(dt)) + ", " + layout_name(la); }

// A tensor of logical shape `shape` with values uniform in [lo, hi), laid out as
// asked, and its logical values in row-major order (computed from the
// contiguous base it views, by index arithmetic).
struct Input {
  Tensor t;
  std::vector<double> ref;
};

Input make_input(const Shape& shape, Generator& gen, DType dt, Layout layout, double lo = -3.0, double hi = 3.0) {
  const int64_t r = int64_t(shape.size());
  if (layout == Layout::Transposed && r < 2) layout = Layout::Sliced;
  Input in;
  in.ref.resize(size_t(numel(shape)));
  if (layout == Layout::Contiguous) {
    in.t = Tensor::rand(shape, gen, dt, Device::cpu(), lo, hi);
    in.ref = in.t.contiguous().to_vector();
  } else if (layout == Layout::Transposed) {
    Shape bs = shape;
    std::swap(bs[size_t(r - 1)], bs[size_t(r - 2)]);
    const Tensor base = Tensor::rand(bs, gen, dt, Device::cpu(), lo, hi);
    const std::vector<double> bv = base.to_vector();
    in.t = base.transpose(-1, -2);
    for (int64_t i = 0; i < numel(shape); ++i) {
      std::vector<int64_t> idx = unravel(i, shape);
      std::swap(idx[size_t(r - 1)], idx[size_t(r - 2)]);
      in.ref[size_t(i)] = bv[size_t(ravel(idx, bs))];
    }
  } else {  // every other element of a last dim of 2n+1: x[..., j] = base[..., 1 + 2j]
    if (r == 0) {
      const Tensor base = Tensor::rand({3}, gen, dt, Device::cpu(), lo, hi);
      in.t = base.select(0, 1);
      in.ref = {base.to_vector()[1]};
      return in;
    }
    Shape bs = shape;
    bs[size_t(r - 1)] = 2 * shape[size_t(r - 1)] + 1;
    const Tensor base = Tensor::rand(bs, gen, dt, Device::cpu(), lo, hi);
    const std::vector<double> bv = base.to_vector();
    in.t = base.slice(-1, 1, bs[size_t(r - 1)], 2);
    for (int64_t i = 0; i < numel(shape); ++i) {
      std::vector<int64_t> idx = unravel(i, shape);
      idx[size_t(r - 1)] = 1 + 2 * idx[size_t(r - 1)];
      in.ref[size_t(i)] = bv[size_t(ravel(idx, bs))];
    }
  }
  EXPECT_EQ(in.t.shape(), shape);
  // the views really are non-contiguous wherever their layout allows it
  if (layout == Layout::Transposed && shape[size_t(r - 1)] > 1 && shape[size_t(r - 2)] > 1) {
    EXPECT_FALSE(in.t.is_contiguous());
  }
  if (layout == Layout::Sliced && r > 0 && shape.back() > 1) {
    EXPECT_FALSE(in.t.is_contiguous());
  }
  return in;
}

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

// ============================================================================
// Matrix products
// ============================================================================

// NumPy matmul in double: 1-D operands promoted and the added dim removed.
std::vector<double> matmul_ref(const std::vector<double>& av, Shape as, const std::vector<double>& bv, Shape bs,
                               Shape& out_shape) {
  const bool a1 = as.size() == 1, b1 = bs.size() == 1;
  if (a1) as.insert(as.begin(), 1);
  if (b1) bs.push_back(1);
  const int64_t m = as[as.size() - 2], k = as.back(), n = bs.back();
  const Shape ab(as.begin(), as.end() - 2), bb(bs.begin(), bs.end() - 2);
  const Shape batch = broadcast(ab, bb);
  std::vector<double> out(size_t(numel(batch) * m * n), 0.0);
  for (int64_t bi = 0; bi < numel(batch); ++bi) {
    const auto idx = unravel(bi, batch);
    const int64_t ia = broadcast_index(idx, ab), ib = broadcast_index(idx, bb);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0.0;
        for (int64_t p = 0; p < k; ++p) s += av[size_t((ia * m + i) * k + p)] * bv[size_t((ib * k + p) * n + j)];
        out[size_t((bi * m + i) * n + j)] = s;
      }
  }
  out_shape = batch;
  if (!a1) out_shape.push_back(m);
  if (!b1) out_shape.push_back(n);
  return out;
}

double matmul_tol(DType dt) { return dt == DType::F64 ? 1e-12 : 1e-5; }

TEST(OpsMatmul, MatchesNaiveLoopForAllShapesAndLayouts) {
  Generator gen(4001);
  const std::pair<Shape, Shape> cases[] = {
      {{37, 53}, {53, 29}},         // 2-D
      {{4, 37, 53}, {4, 53, 29}},   // batched
      {{2, 1, 7, 11}, {3, 11, 5}},  // broadcast batch -> [2, 3, 7, 5]
      {{5, 37, 53}, {53, 29}},      // a shared right operand
      {{13, 17}, {3, 17, 19}},      // a shared left operand
      {{53}, {53, 29}},             // vector · matrix -> [29]
      {{37, 53}, {53}},             // matrix · vector -> [37]
      {{53}, {53}},                 // dot -> 0-d
      {{3, 7, 11}, {11}},           // batched matrix · vector -> [3, 7]
      {{11}, {3, 11, 5}},           // vector · batched matrix -> [3, 5]
      {{7, 1}, {1, 5}},             // k = 1
      {{1, 13}, {13, 1}},           // m = n = 1
      {{2, 3, 1, 9}, {1, 9, 6}},    // size-1 batch dims on both sides
  };
  for (const auto& [sa, sb] : cases) {
    for (DType dt : kFloatTypes) {
      for (Layout la : kLayouts) {
        for (Layout lb : kLayouts) {
          SCOPED_TRACE(shape_str(sa) + " x " + shape_str(sb) + ", " + trace(dt, la) + " / " + layout_name(lb));
          const Input a = make_input(sa, gen, dt, la, -1, 1);
          const Input b = make_input(sb, gen, dt, lb, -1, 1);
          Shape out_shape;
          const std::vector<double> ref = matmul_ref(a.ref, sa, b.ref, sb, out_shape);
          const Tensor y = ops::matmul(a.t, b.t);
          ASSERT_EQ(y.shape(), out_shape);
          EXPECT_EQ(y.dtype(), dt);
          EXPECT_LT(rel_err(y.to_vector(), ref), matmul_tol(dt));
        }
      }
    }
  }
}

TEST(OpsMatmul, PermutedExpandedAndSteppedOperands) {
  Generator gen(4002);
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(dt));
    // batch dim in the middle of memory: [37, 4, 53] permuted to [4, 37, 53]
    const Input base_a = make_input({37, 4, 53}, gen, dt, Layout::Contiguous, -1, 1);
    const Tensor a = base_a.t.permute({1, 0, 2});
    std::vector<double> a_ref(size_t(4 * 37 * 53));
    for (int64_t i = 0; i < numel({4, 37, 53}); ++i) {
      const auto idx = unravel(i, {4, 37, 53});
      a_ref[size_t(i)] = base_a.ref[size_t(ravel({idx[1], idx[0], idx[2]}, {37, 4, 53}))];
    }
    // b: a single matrix expanded (stride 0) over the batch, transposed
    const Input base_b = make_input({29, 53}, gen, dt, Layout::Contiguous, -1, 1);
    const Tensor b = base_b.t.transpose(0, 1).unsqueeze(0).expand({4, 53, 29});
    std::vector<double> b_ref(size_t(4 * 53 * 29));
    for (int64_t i = 0; i < numel({4, 53, 29}); ++i) {
      const auto idx = unravel(i, {4, 53, 29});
      b_ref[size_t(i)] = base_b.ref[size_t(idx[2] * 53 + idx[1])];
    }
    Shape out_shape;
    const std::vector<double> ref = matmul_ref(a_ref, {4, 37, 53}, b_ref, {4, 53, 29}, out_shape);
    const Tensor y = ops::matmul(a, b);
    ASSERT_EQ(y.shape(), out_shape);
    EXPECT_LT(rel_err(y.to_vector(), ref), matmul_tol(dt));

    // rows taken with a step (row stride 3·k) and a column slice (no unit stride anywhere)
    const Input base_c = make_input({3 * 19, 2 * 23}, gen, dt, Layout::Contiguous, -1, 1);
    const Tensor c = base_c.t.slice(0, 0, 3 * 19, 3).slice(1, 1, 2 * 23, 2);  // [19, 23]
    std::vector<double> c_ref(size_t(19 * 23));
    for (int64_t i = 0; i < 19; ++i)
      for (int64_t j = 0; j < 23; ++j) c_ref[size_t(i * 23 + j)] = base_c.ref[size_t((3 * i) * 46 + 1 + 2 * j)];
    const Input d = make_input({23, 31}, gen, dt, Layout::Transposed, -1, 1);
    const std::vector<double> ref2 = matmul_ref(c_ref, {19, 23}, d.ref, {23, 31}, out_shape);
    EXPECT_LT(rel_err(ops::matmul(c, d.t).to_vector(), ref2), matmul_tol(dt));
    EXPECT_LT(rel_err(ops::matmul(d.t.transpose(0, 1), c.transpose(0, 1)).transpose(0, 1).to_vector(), ref2),
              matmul_tol(dt));
  }
}

TEST(OpsMatmul, LargeBatchedProductAcrossThreads) {
  Generator gen(4003);
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const Input a = make_input({7, 61, 45}, gen, dt, Layout::Transposed, -1, 1);
    const Input b = make_input({7, 45, 67}, gen, dt, Layout::Sliced, -1, 1);
    Shape out_shape;
    const std::vector<double> ref = matmul_ref(a.ref, {7, 61, 45}, b.ref, {7, 45, 67}, out_shape);
    EXPECT_LT(rel_err(ops::matmul(a.t, b.t).to_vector(), ref), matmul_tol(dt));
  }
}

TEST(OpsMatmul, EmptyInnerDimGivesZeros) {
  for (DType dt : kFloatTypes) {
    const Tensor y = ops::matmul(Tensor::zeros({3, 0}, dt), Tensor::zeros({0, 4}, dt));
    EXPECT_EQ(y.shape(), (Shape{3, 4}));
    EXPECT_EQ(y.to_vector(), std::vector<double>(12, 0.0));
    EXPECT_EQ(ops::matmul(Tensor::zeros({2, 0, 5}, dt), Tensor::zeros({5, 3}, dt)).shape(), (Shape{2, 0, 3}));
  }
}

TEST(OpsLinear, MatchesReferenceWithAndWithoutBiasAnd3dInput) {
  Generator gen(4004);
  for (DType dt : kFloatTypes) {
    for (Layout lx : kLayouts) {
      for (Layout lw : kLayouts) {
        SCOPED_TRACE(trace(dt, lx) + " / weight " + layout_name(lw));
        const Input w = make_input({5, 11}, gen, dt, lw, -1, 1);
        const Input bias = make_input({5}, gen, dt, lw, -1, 1);
        for (const Shape& xs : {Shape{7, 11}, Shape{2, 3, 11}, Shape{11}}) {
          const Input x = make_input(xs, gen, dt, lx, -1, 1);
          const int64_t rows = numel(xs) / 11;
          std::vector<double> ref(size_t(rows * 5)), ref_b(size_t(rows * 5));
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t o = 0; o < 5; ++o) {
              double s = 0.0;
              for (int64_t i = 0; i < 11; ++i) s += x.ref[size_t(r * 11 + i)] * w.ref[size_t(o * 11 + i)];
              ref[size_t(r * 5 + o)] = s;
              ref_b[size_t(r * 5 + o)] = s + bias.ref[size_t(o)];
            }
          Shape ys = xs;
          ys.back() = 5;
          const Tensor y = ops::linear(x.t, w.t);
          const Tensor yb = ops::linear(x.t, w.t, bias.t);
          ASSERT_EQ(y.shape(), ys);
          ASSERT_EQ(yb.shape(), ys);
          EXPECT_LT(rel_err(y.to_vector(), ref), matmul_tol(dt));
          EXPECT_LT(rel_err(yb.to_vector(), ref_b), matmul_tol(dt));
        }
      }
    }
  }
}

TEST(OpsLinear, BadWeightBiasOrInputThrowsNamingLinear) {
  const Tensor x = Tensor::zeros({7, 11}), w = Tensor::zeros({5, 11});
  EXPECT_THAT(error_of([&] { ops::linear(x, Tensor::zeros({5, 10})); }), HasSubstr("linear"));
  EXPECT_THAT(error_of([&] { ops::linear(x, Tensor::zeros({11})); }), HasSubstr("linear"));
  EXPECT_THAT(error_of([&] { ops::linear(x, w, Tensor::zeros({4})); }), HasSubstr("linear"));
  EXPECT_THAT(error_of([&] { ops::linear(x, w, Tensor::zeros({1, 5})); }), HasSubstr("linear"));
  EXPECT_THAT(error_of([&] { ops::linear(x, w, Tensor::zeros({5}, DType::F64)); }), HasSubstr("f64"));
}

// ============================================================================
// Softmax family
// ============================================================================

// Reference softmax / log_softmax / logsumexp of `v` (shape) along d, in double.
struct SoftmaxRef {
  std::vector<double> softmax, log_softmax, lse;  // lse in keepdim layout
};

SoftmaxRef softmax_ref(const std::vector<double>& v, const Shape& shape, int64_t d) {
  Shape kept = shape;
  kept[size_t(d)] = 1;
  std::vector<double> mx(size_t(numel(kept)), -kInf), sum(size_t(numel(kept)), 0.0);
  auto row = [&](int64_t i) {
    auto idx = unravel(i, shape);
    idx[size_t(d)] = 0;
    return size_t(ravel(idx, kept));
  };
  for (int64_t i = 0; i < numel(shape); ++i) mx[row(i)] = std::max(mx[row(i)], v[size_t(i)]);
  for (int64_t i = 0; i < numel(shape); ++i) sum[row(i)] += std::exp(v[size_t(i)] - mx[row(i)]);
  SoftmaxRef r;
  r.softmax.resize(v.size());
  r.log_softmax.resize(v.size());
  for (int64_t i = 0; i < numel(shape); ++i) {
    r.softmax[size_t(i)] = std::exp(v[size_t(i)] - mx[row(i)]) / sum[row(i)];
    r.log_softmax[size_t(i)] = v[size_t(i)] - mx[row(i)] - std::log(sum[row(i)]);
  }
  r.lse.resize(mx.size());
  for (size_t j = 0; j < mx.size(); ++j) r.lse[j] = mx[j] + std::log(sum[j]);
  return r;
}

// f32_tol: the relative error allowed in f32 (f64 always gets 4e-12).
void check_softmax_family(const Input& x, const Shape& shape, DType dt, int64_t dim, double f32_tol = 4e-6) {
  const double rtol = dt == DType::F64 ? 4e-12 : f32_tol;
  const int64_t d = dim < 0 ? dim + int64_t(shape.size()) : dim;
  const SoftmaxRef ref = softmax_ref(x.ref, shape, d);
  const Tensor s = ops::softmax(x.t, dim);
  const Tensor ls = ops::log_softmax(x.t, dim);
  ASSERT_EQ(s.shape(), shape);
  ASSERT_EQ(ls.shape(), shape);
  const std::vector<double> sv = s.to_vector(), lsv = ls.to_vector();
  ASSERT_TRUE(all_finite(sv));
  ASSERT_TRUE(all_finite(lsv));
  EXPECT_LT(rel_err(sv, ref.softmax), rtol);
  EXPECT_LT(rel_err(lsv, ref.log_softmax), rtol);
  // rows along `dim` sum to 1
  const std::vector<double> rows = ops::sum(s, {dim}).to_vector();
  for (double r : rows) EXPECT_NEAR(r, 1.0, dt == DType::F64 ? 1e-12 : 1e-5);
  Shape kept = shape, squeezed;
  kept[size_t(d)] = 1;
  for (size_t i = 0; i < shape.size(); ++i)
    if (int64_t(i) != d) squeezed.push_back(shape[i]);
  const Tensor lk = ops::logsumexp(x.t, dim, true), ln = ops::logsumexp(x.t, dim);
  ASSERT_EQ(lk.shape(), kept);
  ASSERT_EQ(ln.shape(), squeezed);
  EXPECT_LT(rel_err(lk.to_vector(), ref.lse), rtol);
  EXPECT_LT(rel_err(ln.to_vector(), ref.lse), rtol);
}

TEST(OpsSoftmax, SoftmaxLogSoftmaxLogsumexpAlongEachDim) {
  Generator gen(5001);
  const Shape shape{4, 5, 7};
  for (DType dt : kFloatTypes) {
    for (Layout la : kLayouts) {
      const Input x = make_input(shape, gen, dt, la, -4, 4);
      for (int64_t dim : {0, 1, 2, -1, -2, -3}) {
        SCOPED_TRACE("dim " + std::to_string(dim) + ", " + trace(dt, la));
        check_softmax_family(x, shape, dt, dim);
      }
    }
  }
}

TEST(OpsSoftmax, LargeMagnitudeInputsStayFinite) {
  Generator gen(5002);
  const Shape shape{3, 6, 9};
  for (DType dt : kFloatTypes) {
    for (auto [lo, hi] : {std::pair<double, double>{995, 1005}, {-3000, 3000}, {-1005, -995}}) {
      for (Layout la : {Layout::Contiguous, Layout::Transposed}) {
        const Input x = make_input(shape, gen, dt, la, lo, hi);
        for (int64_t dim : {0, 1, 2}) {
          SCOPED_TRACE("range [" + std::to_string(lo) + ", " + std::to_string(hi) + "), dim " + std::to_string(dim) +
                       ", " + trace(dt, la));
          // finite and close; f32 log_softmax accuracy at large offsets is checked
          // separately (LogSoftmaxKeepsF32PrecisionAtLargeOffsets)
          check_softmax_family(x, shape, dt, dim, 1e-4);
        }
      }
    }
  }
}

// log_softmax(x) = (x - max) - log Σ exp(x - max): x - max is exact, so the
// result should be accurate to a few ulps of itself even when x is ~1000.
// Computing x - (max + log Σ) instead rounds max + log Σ at the scale of max
// (ulp(1000) = 6e-5 in f32), hundreds of ulps of a result near -0.4.
TEST(OpsSoftmax, LogSoftmaxKeepsF32PrecisionAtLargeOffsets) {
  std::vector<double> xs;
  for (int r = 0; r < 3; ++r)
    for (int k = 0; k < 13; ++k) xs.push_back(1000.0 * (r + 1) + 0.25 * k + 0.125 * r);  // exact in f32
  const Tensor x = Tensor::from_values(xs, {3, 13}, DType::F32);
  const SoftmaxRef ref = softmax_ref(xs, {3, 13}, 1);
  const std::vector<double> ls = ops::log_softmax(x, 1).to_vector();
  double worst = 0.0;
  for (size_t i = 0; i < xs.size(); ++i)
    worst = std::max(worst, std::abs(ls[i] - ref.log_softmax[i]) / (std::abs(ref.log_softmax[i]) + 1e-3));
  EXPECT_LT(worst, 2e-6) << "f32 log_softmax relative error at inputs ~1000-3000";
  // softmax itself (exp(x - max) / Σ) is accurate there
  EXPECT_LT(rel_err(ops::softmax(x, 1).to_vector(), ref.softmax), 1e-6);
}

TEST(OpsSoftmax, MaskedEntriesWithMinusInfinity) {
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const Tensor x = Tensor::from_values({0.0, -kInf, 1.0, -kInf, 2.0, 2.0, -kInf, -kInf}, {2, 4}, dt);
    const std::vector<double> s = ops::softmax(x, 1).to_vector();
    const double e = std::exp(1.0);
    EXPECT_NEAR(s[0], 1.0 / (1.0 + e), 1e-6);
    EXPECT_EQ(s[1], 0.0);
    EXPECT_NEAR(s[2], e / (1.0 + e), 1e-6);
    EXPECT_EQ(s[3], 0.0);
    EXPECT_NEAR(s[4], 0.5, 1e-7);
    EXPECT_EQ(s[6], 0.0);
    const std::vector<double> ls = ops::log_softmax(x, 1).to_vector();
    EXPECT_EQ(ls[1], -kInf);
    EXPECT_NEAR(ls[4], std::log(0.5), 1e-6);
    // a fully masked row has logsumexp -inf (not NaN); the other row is finite
    const Tensor masked = Tensor::from_values({-kInf, -kInf, -kInf, 0.0, 1.0, 2.0}, {2, 3}, dt);
    const std::vector<double> l = ops::logsumexp(masked, 1).to_vector();
    EXPECT_EQ(l[0], -kInf);
    EXPECT_NEAR(l[1], std::log(1.0 + e + e * e), 1e-6);
  }
}

TEST(OpsSoftmax, LargeRowsAboveParallelThreshold) {
  Generator gen(5003);
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const Input x = make_input({67, 613}, gen, dt, Layout::Transposed, -6, 6);
    check_softmax_family(x, {67, 613}, dt, 1);
    check_softmax_family(x, {67, 613}, dt, 0);
  }
}

// softmax_backward along every dim and layout against y∘(dy − Σ dy∘y) computed in double here.
TEST(OpsSoftmax, BackwardMatchesTheComposedRule) {
  Generator gen(5004);
  const Shape shape{7, 13, 5};
  for (DType dt : kFloatTypes) {
    for (Layout la : kLayouts) {
      for (int64_t d : {0, 1, 2, -1}) {
        SCOPED_TRACE(trace(dt, la) + " dim " + std::to_string(d));
        const Input x = make_input(shape, gen, dt, la, -3, 3);
        const Tensor y = ops::softmax(x.t, d), dy = Tensor::randn(shape, gen, dt);
        const Tensor y64 = y.to(DType::F64), g64 = dy.to(DType::F64);
        const std::vector<double> ref = ops::mul(y64, ops::sub(g64, ops::sum(ops::mul(g64, y64), {d}, true))).to_vector();
        const Tensor dx = ops::softmax_backward(y, dy, d);
        EXPECT_EQ(dx.shape(), shape);
        EXPECT_LT(scaled_err(dx.to_vector(), ref), tol(dt));
      }
    }
  }
}

TEST(OpsMatmul, AlphaScalesInsideTheGemm) {
  Generator gen(4005);
  for (DType dt : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const Tensor a = Tensor::randn({3, 5, 7}, gen, dt), b = Tensor::randn({7, 4}, gen, dt);
    const std::vector<double> ref = ops::mul_scalar(ops::matmul(a.to(DType::F64), b.to(DType::F64)), -0.25).to_vector();
    EXPECT_LT(scaled_err(ops::matmul(a, b, -0.25).to_vector(), ref), tol(dt));
  }
}

// ============================================================================
// cat
// ============================================================================

TEST(OpsCat, ConcatenatesAlongEachDim) {
  Generator gen(6001);
  const Shape base{3, 5, 4};
  for (DType dt : {DType::F32, DType::F64, DType::BF16}) {
    for (int64_t dim : {0, 1, 2, -1, -3}) {
      const int64_t d = dim < 0 ? dim + 3 : dim;
      for (Layout la : kLayouts) {
        SCOPED_TRACE("dim " + std::to_string(dim) + ", " + trace(dt, la));
        std::vector<Input> parts;
        std::vector<Tensor> ts;
        for (int64_t len : {2, 4, 1, 0, 3}) {
          Shape s = base;
          s[size_t(d)] = len;
          parts.push_back(make_input(s, gen, dt, la));
          ts.push_back(parts.back().t);
        }
        const Tensor y = ops::cat(ts, dim);
        Shape out = base;
        out[size_t(d)] = 10;
        ASSERT_EQ(y.shape(), out);
        EXPECT_EQ(y.dtype(), dt);
        std::vector<double> ref(size_t(numel(out)));
        for (int64_t i = 0; i < numel(out); ++i) {
          std::vector<int64_t> idx = unravel(i, out);
          size_t p = 0;
          while (idx[size_t(d)] >= parts[p].t.shape()[size_t(d)]) idx[size_t(d)] -= parts[p++].t.shape()[size_t(d)];
          ref[size_t(i)] = parts[p].ref[size_t(ravel(idx, parts[p].t.shape()))];
        }
        EXPECT_EQ(y.to_vector(), ref);
      }
    }
  }
}

TEST(OpsCat, SingleTensorIsACopy) {
  const Tensor a = Tensor::from_values({1, 2, 3, 4, 5, 6}, {2, 3});
  const Tensor y = ops::cat({a}, 1);
  EXPECT_EQ(y.to_vector(), a.to_vector());
  EXPECT_NE(y.storage(), a.storage());
}

TEST(OpsCat, IncompatibleInputsThrowNamingCat) {
  const Tensor a = Tensor::zeros({2, 3}), b = Tensor::zeros({2, 4});
  EXPECT_THAT(error_of([] { ops::cat({}, 0); }), HasSubstr("cat"));
  const std::string shape_msg = error_of([&] { ops::cat({a, b}, 0); });
  EXPECT_THAT(shape_msg, HasSubstr("cat"));
  EXPECT_THAT(shape_msg, HasSubstr("[2, 4]"));
  EXPECT_THAT(error_of([&] { ops::cat({a, Tensor::zeros({2, 3, 1})}, 0); }), HasSubstr("rank"));
  const std::string dt_msg = error_of([&] { ops::cat({a, Tensor::zeros({2, 3}, DType::F64)}, 0); });
  EXPECT_THAT(dt_msg, HasSubstr("f32"));
  EXPECT_THAT(dt_msg, HasSubstr("f64"));
  EXPECT_THAT(error_of([&] { ops::cat({a, a}, 2); }), HasSubstr("out of range"));
  EXPECT_THAT(error_of([&] { ops::cat({a, Tensor()}, 0); }), HasSubstr("undefined"));
}

// ============================================================================
// Bad input: each error names the op and what is wrong
// ============================================================================

TEST(OpsErrors, AddShapeMismatchNamesBothShapes) {
  const std::string msg = error_of([] { ops::add(Tensor::zeros({2, 3}), Tensor::zeros({4})); });
  EXPECT_THAT(msg, HasSubstr("add"));
  EXPECT_THAT(msg, HasSubstr("[2, 3]"));
  EXPECT_THAT(msg, HasSubstr("[4]"));
}

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

TEST(OpsErrors, MatmulInnerDimMismatch) {
  const std::string msg = error_of([] { ops::matmul(Tensor::zeros({3, 4}), Tensor::zeros({5, 6})); });
  EXPECT_THAT(msg, HasSubstr("matmul"));
  EXPECT_THAT(msg, HasSubstr("[3, 4]"));
  EXPECT_THAT(msg, HasSubstr("[5, 6]"));
  EXPECT_THAT(error_of([] { ops::matmul(Tensor::zeros({4}), Tensor::zeros({5})); }), HasSubstr("matmul"));
}

TEST(OpsErrors, MatmulBatchMismatchAndZeroDimOperands) {
  EXPECT_THAT(error_of([] { ops::matmul(Tensor::zeros({2, 3, 4}), Tensor::zeros({3, 4, 5})); }),
              HasSubstr("matmul"));
  EXPECT_THAT(error_of([] { ops::matmul(Tensor::scalar(1.0), Tensor::zeros({3, 4})); }), HasSubstr("matmul"));
  EXPECT_THAT(error_of([] { ops::matmul(Tensor::zeros({3, 4}), Tensor::scalar(1.0)); }), HasSubstr("matmul"));
}

TEST(OpsErrors, DtypeMismatchNamesBothDtypes) {
  const Tensor a = Tensor::zeros({2, 3}, DType::F32), b = Tensor::zeros({2, 3}, DType::F64);
  for (const auto& [name, fn] : std::vector<std::pair<std::string, std::function<void()>>>{
           {"add", [&] { ops::add(a, b); }},
           {"maximum", [&] { ops::maximum(b, a); }},
           {"matmul", [&] { ops::matmul(a, b.transpose(0, 1)); }},
           {"linear", [&] { ops::linear(a, b); }},
       }) {
    SCOPED_TRACE(name);
    const std::string msg = error_of(fn);
    EXPECT_THAT(msg, HasSubstr(name));
    EXPECT_THAT(msg, HasSubstr("f32"));
    EXPECT_THAT(msg, HasSubstr("f64"));
  }
}

TEST(OpsErrors, OutOfRangeDimNamesTheOp) {
  const Tensor x = Tensor::zeros({2, 3});
  for (const auto& [name, fn] : std::vector<std::pair<std::string, std::function<void()>>>{
           {"sum", [&] { ops::sum(x, {2}); }},
           {"mean", [&] { ops::mean(x, {-3}); }},
           {"amax", [&] { ops::amax(x, {0, 5}); }},
           {"softmax", [&] { ops::softmax(x, 2); }},
           {"log_softmax", [&] { ops::log_softmax(x, -3); }},
           {"logsumexp", [&] { ops::logsumexp(x, 2); }},
           {"cat", [&] { ops::cat({x, x}, -3); }},
       }) {
    SCOPED_TRACE(name);
    const std::string msg = error_of(fn);
    EXPECT_THAT(msg, HasSubstr("out of range"));
    EXPECT_THAT(msg, HasSubstr(name));
  }
}

TEST(OpsErrors, RepeatedReductionDimThrows) {
  const Tensor x = Tensor::zeros({2, 3});
  EXPECT_THAT(error_of([&] { ops::sum(x, {1, -1}); }), HasSubstr("repeated"));
  EXPECT_THAT(error_of([&] { ops::amax(x, {0, 0}); }), HasSubstr("repeated"));
}

TEST(OpsErrors, UndefinedOperandThrows) {
  const Tensor x = Tensor::zeros({2});
  EXPECT_THAT(error_of([&] { ops::add(x, Tensor()); }), HasSubstr("undefined"));
  EXPECT_THAT(error_of([&] { ops::exp(Tensor()); }), HasSubstr("undefined"));
  EXPECT_THAT(error_of([&] { ops::sum(Tensor()); }), HasSubstr("undefined"));
  EXPECT_THAT(error_of([&] { ops::softmax(Tensor(), 0); }), HasSubstr("undefined"));
}

// The CPU backend computes in f32 and f64 only: every op on bf16, f16 or i64 CPU
// tensors throws, naming the op, the device and the dtype.
struct NamedOp {
  std::string name;
  std::function<void(const Tensor&)> fn;  // x has shape [3, 4]
};

std::vector<NamedOp> kernel_ops() {
  return {
      {"add", [](const Tensor& x) { ops::add(x, x); }},
      {"sub", [](const Tensor& x) { ops::sub(x, x); }},
      {"mul", [](const Tensor& x) { ops::mul(x, x); }},
      {"div", [](const Tensor& x) { ops::div(x, x); }},
      {"maximum", [](const Tensor& x) { ops::maximum(x, x); }},
      {"minimum", [](const Tensor& x) { ops::minimum(x, x); }},
      {"add_scalar", [](const Tensor& x) { ops::add_scalar(x, 1.0); }},
      {"mul_scalar", [](const Tensor& x) { ops::mul_scalar(x, 2.0); }},
      {"pow", [](const Tensor& x) { ops::pow_scalar(x, 2.0); }},
      {"neg", [](const Tensor& x) { ops::neg(x); }},
      {"exp", [](const Tensor& x) { ops::exp(x); }},
      {"log", [](const Tensor& x) { ops::log(x); }},
      {"sqrt", [](const Tensor& x) { ops::sqrt(x); }},
      {"rsqrt", [](const Tensor& x) { ops::rsqrt(x); }},
      {"tanh", [](const Tensor& x) { ops::tanh(x); }},
      {"sigmoid", [](const Tensor& x) { ops::sigmoid(x); }},
      {"relu", [](const Tensor& x) { ops::relu(x); }},
      {"step", [](const Tensor& x) { ops::step(x); }},
      {"gelu", [](const Tensor& x) { ops::gelu(x); }},
      {"gelu_grad", [](const Tensor& x) { ops::gelu_grad(x, true); }},
      {"abs", [](const Tensor& x) { ops::abs(x); }},
      {"square", [](const Tensor& x) { ops::square(x); }},
      {"reciprocal", [](const Tensor& x) { ops::reciprocal(x); }},
      {"sum", [](const Tensor& x) { ops::sum(x, {1}); }},
      {"amax", [](const Tensor& x) { ops::amax(x); }},
      {"matmul", [](const Tensor& x) { ops::matmul(x, x.transpose(0, 1)); }},
      {"softmax", [](const Tensor& x) { ops::softmax(x, 1); }},
      {"log_softmax", [](const Tensor& x) { ops::log_softmax(x, 0); }},
  };
}

// bf16 / f16 on the CPU: stored in the low precision, computed in f32 (tensor/precision.h), so
// the result is the f32 result rounded once.
TEST(OpsBf16OnCpu, ComputedInF32AndRoundedOnce) {
  const Tensor x = Tensor::from_values({0.5, 1.0, 1.5, -2.0, 3.0}, {5}, DType::BF16);
  const Tensor y = ops::exp(x);
  EXPECT_EQ(y.dtype(), DType::BF16);
  EXPECT_EQ(y.to_vector(), ops::exp(x.to(DType::F32)).to(DType::BF16).to_vector());
  const Tensor a = Tensor::from_values({1, 2, 3, 4, 5, 6}, {2, 3}, DType::F16);
  const Tensor b = Tensor::from_values({0.5, -1, 2, 0.25, 3, -2}, {3, 2}, DType::F16);
  EXPECT_EQ(ops::matmul(a, b).to_vector(),
            ops::matmul(a.to(DType::F32), b.to(DType::F32)).to(DType::F16).to_vector());
}

TEST(OpsBf16OnCpu, EveryKernelOpRunsOnBf16AndF16) {
  for (DType dt : {DType::BF16, DType::F16}) {
    const Tensor x = Tensor::ones({3, 4}, dt);
    for (const NamedOp& op : kernel_ops()) {
      SCOPED_TRACE(op.name + " on " + loom::dtype_name(dt));
      EXPECT_EQ(error_of([&] { op.fn(x); }), "<no error>");
    }
  }
}

TEST(OpsErrors, EveryKernelOpOnI64CpuTensorsNamesOpDeviceAndDtype) {
  for (DType dt : {DType::I64}) {
    const Tensor x = Tensor::ones({3, 4}, dt);
    for (const NamedOp& op : kernel_ops()) {
      SCOPED_TRACE(op.name + " on " + loom::dtype_name(dt));
      const std::string msg = error_of([&] { op.fn(x); });
      EXPECT_THAT(msg, HasSubstr(op.name + ":"));
      EXPECT_THAT(msg, HasSubstr("cpu"));
      EXPECT_THAT(msg, HasSubstr(loom::dtype_name(dt)));
    }
  }
}

// Ops composed of other ops must still name themselves (ops.h: "throws
// loom::Error naming the op"), not the inner op the user never called.
TEST(OpsErrors, CompositeOpsNameThemselvesOnUnsupportedDtype) {
  const Tensor x = Tensor::ones({3, 4}, DType::I64);
  for (const NamedOp& op : std::vector<NamedOp>{
           {"mean", [](const Tensor& t) { ops::mean(t, {1}); }},
           {"logsumexp", [](const Tensor& t) { ops::logsumexp(t, 1); }},
           {"linear", [](const Tensor& t) { ops::linear(t, Tensor::ones({2, 4}, DType::I64)); }},
           {"sum_to", [](const Tensor& t) { ops::sum_to(t, {1, 4}); }},
       }) {
    SCOPED_TRACE(op.name);
    const std::string msg = error_of([&] { op.fn(x); });
    EXPECT_THAT(msg, HasSubstr("i64"));
    EXPECT_THAT(msg, HasSubstr("cpu"));
    EXPECT_THAT(msg, HasSubstr(op.name));
  }
}

TEST(OpsErrors, CatAndCopiesStillWorkForBf16OnCpu) {
  // copy kernels exist for every dtype, so cat must not be refused
  const Tensor a = Tensor::from_values({1, 2, 3}, {3}, DType::BF16);
  const Tensor b = Tensor::from_values({-0.5, 8}, {2}, DType::BF16);
  const Tensor y = ops::cat({a, b}, 0);
  EXPECT_EQ(y.dtype(), DType::BF16);
  EXPECT_EQ(y.to_vector(), (std::vector<double>{1, 2, 3, -0.5, 8}));
}

// ============================================================================
// 0-d tensors with a dim argument (wrap_dim accepts 0 / -1 for rank 0): the op
// must give the 0-d answer or throw, not index the empty shape. Run in a child
// process so that a crash fails only this test.
// ============================================================================

TEST(OpsScalarDims, LogsumexpOfZeroDimTensorIsTheValueOrThrows) {
  LOOM_EXPECT_CHILD_EXITS_0({
    try {
      const Tensor r = ops::logsumexp(Tensor::scalar(1.5, DType::F64), 0);
      std::_Exit(r.dim() == 0 && std::abs(r.item() - 1.5) < 1e-12 ? 0 : 3);
    } catch (const loom::Error&) {
      std::_Exit(0);
    }
  });
}

TEST(OpsScalarDims, CatOfZeroDimTensorsThrowsInsteadOfCrashing) {
  LOOM_EXPECT_CHILD_EXITS_0({
    try {
      (void)ops::cat({Tensor::scalar(1.0), Tensor::scalar(2.0)}, 0);
    } catch (const loom::Error&) {
      std::_Exit(0);
    }
    std::_Exit(3);
  });
}

TEST(OpsScalarDims, SoftmaxAndReductionsOfZeroDimTensor) {
  const Tensor s = Tensor::scalar(-4.0, DType::F64);
  EXPECT_EQ(ops::softmax(s, 0).item(), 1.0);
  EXPECT_EQ(ops::log_softmax(s, -1).item(), 0.0);
  EXPECT_EQ(ops::sum(s, {0}).item(), -4.0);
  EXPECT_EQ(ops::amax(s, {-1}, true).shape(), Shape{});
}

}  // namespace
