// conv2d through im2col + GEMM against a direct six-loop convolution, in f64, at
// odd sizes, strides and paddings; col2im against its definition as im2col's adjoint.
#include <gtest/gtest.h>

#include <cmath>

#include "tensor/constants.h"
#include "tensor/conv.h"
#include "tensor/ops.h"
#include "tensor/ops_fused.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

// y[n,o,oy,ox] = b[o] + Σ_{c,i,j} w[o,c,i,j]·x[n,c,oy·s−p+i, ox·s−p+j] (zero outside).
std::vector<double> direct_conv(const Tensor& x, const Tensor& w, const Tensor& b, const ops::Conv2dParams& p,
                                int64_t oh, int64_t ow) {
  const auto xv = x.to_vector(), wv = w.to_vector(), bv = b.to_vector();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = w.size(0), kh = w.size(2), kw = w.size(3);
  std::vector<double> y(size_t(N * O * oh * ow));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox) {
          double s = bv[size_t(o)];
          for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < kh; ++i)
              for (int64_t j = 0; j < kw; ++j) {
                const int64_t yy = oy * p.stride_h - p.pad_h + i, xx = ox * p.stride_w - p.pad_w + j;
                if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
                s += wv[size_t(((o * C + c) * kh + i) * kw + j)] * xv[size_t(((n * C + c) * H + yy) * W + xx)];
              }
          y[size_t(((n * O + o) * oh + oy) * ow + ox)] = s;
        }
  return y;
}

struct ConvCase {
  Shape x, w;
  ops::Conv2dParams p;
};

class ConvVsDirect : public ::testing::TestWithParam<ConvCase> {};

TEST_P(ConvVsDirect, MatchesDirectLoopsInF64) {
  const ConvCase c = GetParam();
  Generator gen(::testing::UnitTest::GetInstance()->random_seed() + 17);
  const Tensor x = Tensor::randn(c.x, gen, DType::F64), w = Tensor::randn(c.w, gen, DType::F64);
  const Tensor b = Tensor::randn({c.w[0]}, gen, DType::F64);
  const Tensor y = ops::conv2d(x, w, b, c.p);
  const Im2ColArgs g = ops::conv2d_geometry(c.x, c.w[2], c.w[3], c.p);
  ASSERT_EQ(y.shape(), Shape({c.x[0], c.w[0], g.out_h, g.out_w}));
  const auto ref = direct_conv(x, w, b, c.p, g.out_h, g.out_w);
  const auto got = y.to_vector();
  for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(got[i], ref[i], 1e-12 * (1 + std::abs(ref[i]))) << i;
}

INSTANTIATE_TEST_SUITE_P(Shapes, ConvVsDirect,
                         ::testing::Values(ConvCase{{2, 3, 7, 5}, {4, 3, 3, 3}, {1, 1, 1, 1}},
                                           ConvCase{{1, 2, 9, 8}, {3, 2, 3, 3}, {2, 2, 1, 1}},
                                           ConvCase{{2, 3, 6, 7}, {2, 3, 2, 3}, {1, 2, 0, 2}},
                                           ConvCase{{3, 4, 5, 3}, {5, 4, 1, 1}, {1, 1, 0, 0}},
                                           ConvCase{{1, 1, 4, 4}, {1, 1, 4, 4}, {3, 3, 0, 0}}));

// Above the column budget (LOOM_CONV_COLUMN_BYTES here; 256 MiB by default) the forward builds the
// im2col columns a few samples at a time: one sample per chunk (a budget below one sample's
// columns), two and a remainder of one, and the whole batch give the direct loops' result.
TEST(Conv2d, ColumnBudgetSplitsTheBatch) {
  Generator gen(41);
  const Tensor x = Tensor::randn({5, 3, 7, 5}, gen, DType::F64), w = Tensor::randn({4, 3, 3, 3}, gen, DType::F64);
  const Tensor b = Tensor::randn({4}, gen, DType::F64);
  const ops::Conv2dParams p{1, 1, 1, 1};
  const auto ref = direct_conv(x, w, b, p, 7, 5);
  const int64_t per_sample = 3 * 9 * 7 * 5 * 8;  // bytes of one sample's f64 columns
  for (const std::string budget : {std::string("1"), std::to_string(2 * per_sample + 7), std::string("")}) {
    SCOPED_TRACE("LOOM_CONV_COLUMN_BYTES=" + budget);
    loom::testing::ScopedEnv env("LOOM_CONV_COLUMN_BYTES", budget.c_str());
    const auto got = ops::conv2d(x, w, b, p).to_vector();
    ASSERT_EQ(got.size(), ref.size());
    for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(got[i], ref[i], 1e-12 * (1 + std::abs(ref[i]))) << i;
  }
  loom::testing::ScopedEnv bad("LOOM_CONV_COLUMN_BYTES", "0");
  EXPECT_NE(loom::testing::error_of([&] { ops::conv2d(x, w, b, p); }).find("LOOM_CONV_COLUMN_BYTES='0'"),
            std::string::npos);
}

// At stride 1 the input gradient runs as a convolution of g with the flipped, transposed weight;
// it equals col2im(Wᵀ·g) (the definition) in f64 for every padding 0 … k − 1, square or not.
TEST(Conv2dInputGrad, FlippedConvolutionEqualsCol2im) {
  Generator gen(23);
  struct Case { Shape x, w; int64_t ph, pw; };
  for (const Case& c : {Case{{2, 3, 7, 5}, {4, 3, 3, 3}, 1, 1}, Case{{1, 5, 6, 9}, {2, 5, 3, 3}, 0, 2},
                        Case{{2, 2, 5, 6}, {3, 2, 2, 3}, 1, 0}, Case{{1, 3, 8, 8}, {6, 3, 5, 5}, 2, 4}}) {
    SCOPED_TRACE(::testing::PrintToString(c.w) + " pad " + std::to_string(c.ph) + "," + std::to_string(c.pw));
    ops::Conv2dParams p;
    p.pad_h = c.ph, p.pad_w = c.pw;
    const Im2ColArgs geo = ops::conv2d_geometry(c.x, c.w[2], c.w[3], p);
    const Tensor w = Tensor::randn(c.w, gen, DType::F64);
    const Tensor g = Tensor::randn({c.x[0], c.w[0], geo.out_h, geo.out_w}, gen, DType::F64);
    const Tensor ref = ops::col2im(
        ops::matmul(w.reshape({c.w[0], -1}).transpose(0, 1), g.reshape({c.x[0], c.w[0], -1})), geo);
    const Tensor got = ops::conv2d_input_grad(g, w, c.x, p);
    ASSERT_EQ(got.shape(), c.x);
    const auto a = got.to_vector(), b = ref.to_vector();
    for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-12 * (1 + std::abs(b[i]))) << i;
  }
}

TEST(Conv2dInputGrad, FlippedTransposedWeight) {
  Generator gen(24);
  const Tensor w = Tensor::randn({3, 2, 2, 3}, gen, DType::F64);
  const Tensor f = ops::flipped_transposed(w);
  ASSERT_EQ(f.shape(), Shape({2, 3, 2, 3}));
  const auto wv = w.to_vector(), fv = f.to_vector();
  for (int64_t o = 0; o < 3; ++o)
    for (int64_t c = 0; c < 2; ++c)
      for (int64_t i = 0; i < 2; ++i)
        for (int64_t j = 0; j < 3; ++j)
          EXPECT_EQ(fv[size_t(((c * 3 + o) * 2 + i) * 3 + j)], wv[size_t(((o * 2 + c) * 2 + (1 - i)) * 3 + (2 - j))]);
}

// <col2im(c), x> == <c, im2col(x)> for random c and x (the adjoint identity).
TEST(Col2Im, IsTheAdjointOfIm2Col) {
  Generator gen(5);
  const Im2ColArgs g = ops::conv2d_geometry({2, 3, 7, 6}, 3, 2, {2, 1, 1, 2});
  const Tensor x = Tensor::randn({2, 3, 7, 6}, gen, DType::F64);
  const Tensor cols = ops::im2col(x, g);
  const Tensor c = Tensor::randn(cols.shape(), gen, DType::F64);
  const double lhs = ops::sum(ops::mul(ops::col2im(c, g), x)).item();
  const double rhs = ops::sum(ops::mul(c, cols)).item();
  EXPECT_NEAR(lhs, rhs, 1e-10 * (1 + std::abs(rhs)));
}

TEST(Conv2d, ErrorsNameTheShapes) {
  const Tensor x = Tensor::zeros({1, 3, 4, 4}), w = Tensor::zeros({2, 4, 3, 3});
  try {
    ops::conv2d(x, w, Tensor(), {});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("[2, 4, 3, 3]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(ops::conv2d(Tensor::zeros({1, 4, 2, 2}), w, Tensor(), {}), Error);  // kernel larger than input
}

// LOOM_CONV names a path; a misspelt one is an error naming it, and cudnn / igemm on the CPU
// (which has neither) keep im2col + GEMM, giving the same numbers bit for bit.
TEST(Conv2d, ConvPathVariable) {
  Generator gen(9);
  const Tensor x = Tensor::randn({2, 3, 7, 6}, gen, DType::F64), w = Tensor::randn({4, 3, 3, 3}, gen, DType::F64);
  const ops::Conv2dParams p{1, 1, 1, 1};
  const Tensor plain = ops::conv2d(x, w, Tensor(), p);
  for (const char* path : {"auto", "cudnn", "igemm", "im2col"}) {
    loom::testing::ScopedEnv env("LOOM_CONV", path);
    EXPECT_EQ(loom::testing::max_abs_diff(ops::conv2d(x, w, Tensor(), p), plain), 0.0) << path;
    const Tensor g = Tensor::randn(plain.shape(), gen, DType::F64);
    EXPECT_EQ(ops::conv2d_weight_grad(g, x, w.shape(), p).shape(), w.shape()) << path;
  }
  loom::testing::ScopedEnv bad("LOOM_CONV", "cudnnn");
  EXPECT_NE(loom::testing::error_of([&] { ops::conv2d(x, w, Tensor(), p); })
                .find("LOOM_CONV='cudnnn' is not auto, im2col, igemm or cudnn"),
            std::string::npos);
}

// A cached constant is made once per (name, shape, dtype, device): the second call returns the
// same tensor without calling values() again (so no host copy happens inside a graph capture).
TEST(CachedConstant, MadeOncePerKeyAndKept) {
  int made = 0;
  auto values = [&made] {
    ++made;
    return std::vector<double>{1, 2, 3, 4, 5, 6};
  };
  const Tensor& a = cached_constant("test_constant", {2, 3}, DType::F64, Device::cpu(), values);
  const Tensor& b = cached_constant("test_constant", {2, 3}, DType::F64, Device::cpu(), values);
  EXPECT_EQ(&a, &b);
  EXPECT_EQ(made, 1);
  EXPECT_EQ(a.to_vector(), (std::vector<double>{1, 2, 3, 4, 5, 6}));
  const Tensor& c = cached_constant("test_constant", {3, 2}, DType::F32, Device::cpu(), values);
  EXPECT_EQ(made, 2);
  EXPECT_EQ(c.shape(), (Shape{3, 2}));
  EXPECT_EQ(c.dtype(), DType::F32);
}

// conv2d_normed where the device has no im2col_normed (the CPU): the composition it stands for,
// bit for bit; group_norm_statistics: group_norm's mean and rstd, no y.
TEST(ConvNormed, IsTheNormThenTheConvolutionOnTheCpu) {
  Generator gen(17);
  const Tensor x = Tensor::randn({2, 6, 5, 7}, gen, DType::F64), w = Tensor::randn({4, 6, 3, 3}, gen, DType::F64);
  const Tensor b = Tensor::randn({4}, gen, DType::F64), shift = Tensor::randn({2, 6}, gen, DType::F64);
  const Tensor gamma = Tensor::randn({6}, gen, DType::F64), beta = Tensor::randn({6}, gen, DType::F64);
  ops::GroupNormBeforeConv n;
  n.groups = 3, n.weight = gamma, n.bias = beta, n.shift = shift, n.eps = 1e-6, n.silu = true;
  const ops::Conv2dParams p{2, 2, 1, 1};
  const Tensor fused = ops::conv2d_normed(x, n, w, b, p);
  const Tensor composed = ops::conv2d(ops::group_norm(x, 3, gamma, beta, 1e-6, true, shift).y, w, b, p);
  EXPECT_EQ(loom::testing::max_abs_diff(fused, composed), 0.0);
  const ops::NormForward stats = ops::group_norm_statistics(x, 3, 1e-6, shift);
  const ops::NormForward full = ops::group_norm(x, 3, Tensor(), Tensor(), 1e-6, false, shift);
  EXPECT_FALSE(stats.y.defined());
  EXPECT_EQ(loom::testing::max_abs_diff(stats.mean, full.mean), 0.0);
  EXPECT_EQ(loom::testing::max_abs_diff(stats.rstd, full.rstd), 0.0);
}

}  // namespace
}  // namespace loom::test
