// Tests of loom::ops matmul, linear and the softmax family on the CPU backend, against reference
// loops in double precision, in f32 and f64, on contiguous and non-contiguous operands (the
// conventions of test_ops.cpp).
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

}  // namespace
