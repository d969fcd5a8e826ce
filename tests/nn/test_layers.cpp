// nn layers: values against hand-written reference loops, f64 gradient checks
// with respect to the input and every parameter, diffusers' key names, and the
// LinearExtension hook (ctest -L nn).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "nn/feedforward.h"
#include "nn/linear.h"
#include "nn/norm.h"
#include "tests/test_helpers.h"

namespace loom::nn {
namespace {

using loom::testing::error_of;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr DType F64 = DType::F64;

Variable randn(const Shape& shape, Generator& gen, bool requires_grad = false) {
  return Variable(Tensor::randn(shape, gen, F64), requires_grad);
}

// Gives every parameter fresh N(0, 1) values (norm layers start at 1 / 0,
// which would hide a wrong gradient for their weight or bias).
void randomize(Module& m, Generator& gen) {
  for (const auto& [name, p] : m.named_parameters()) p.tensor().copy_(Tensor::randn(p.shape(), gen, p.dtype()));
}

// Gradient check of m.forward with respect to a random input x and all of m's parameters.
void expect_gradcheck(const UnaryModule& m, const Shape& x_shape, uint64_t seed) {
  Generator gen(seed);
  std::vector<Variable> inputs{randn(x_shape, gen, true)};
  for (const Variable& p : m.parameters()) {
    ASSERT_EQ(p.dtype(), F64);
    inputs.push_back(p);
  }
  const GradcheckResult r = gradcheck([&m](const std::vector<Variable>& in) { return m.forward(in[0]); }, inputs);
  EXPECT_TRUE(r.ok) << m.type_name() << ": " << r.message;
}

double gelu_ref(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }
double gelu_tanh_ref(double v) {
  return 0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
}

// z[r][o] = Σ_i x[r][i]·W[o][i] + b[o] over the rows of x [..., in] (W row-major (out, in)).
std::vector<double> affine_ref(const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& b,
                               int64_t in, int64_t out) {
  const int64_t rows = int64_t(x.size()) / in;
  std::vector<double> z(size_t(rows * out));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < out; ++o) {
      double acc = b.empty() ? 0.0 : b[size_t(o)];
      for (int64_t i = 0; i < in; ++i) acc += x[size_t(r * in + i)] * w[size_t(o * in + i)];
      z[size_t(r * out + o)] = acc;
    }
  return z;
}

void expect_near(const std::vector<double>& got, const std::vector<double>& want, double tol = 1e-12) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "element " << i;
}

// ---- Linear / Conv1x1 ----------------------------------------------------------------------

TEST(Linear, ParametersShapesAndDefaultInitBounds) {
  Generator gen(1);
  Linear lin(16, 5, true, gen);
  EXPECT_EQ(lin.weight().shape(), (Shape{5, 16}));
  EXPECT_EQ(lin.bias().shape(), (Shape{5}));
  EXPECT_EQ(lin.weight().dtype(), DType::F32);
  for (const auto& [name, p] : lin.named_parameters())
    for (double v : p.tensor().to_vector()) EXPECT_LE(std::abs(v), 0.25) << name;  // 1/√16
  Linear no_bias(3, 2, false, gen);
  EXPECT_FALSE(no_bias.bias().defined());
  EXPECT_EQ(no_bias.parameters().size(), 1u);
  EXPECT_EQ(lin.in_features(), 16);
  EXPECT_EQ(lin.out_features(), 5);
}

TEST(Linear, MatchesReferenceLoop) {
  Generator gen(2);
  Linear lin(3, 4, true, gen, F64);
  const Variable x = randn({2, 2, 3}, gen);
  const Variable y = lin.forward(x);
  EXPECT_EQ(y.shape(), (Shape{2, 2, 4}));
  expect_near(y.tensor().to_vector(), affine_ref(x.tensor().to_vector(), lin.weight().tensor().to_vector(),
                                                 lin.bias().tensor().to_vector(), 3, 4));
  EXPECT_THAT(error_of([&] { lin.forward(randn({2, 4}, gen)); }), HasSubstr("expected 3 input features"));
}

TEST(Linear, Gradcheck) {
  Generator gen(3);
  expect_gradcheck(Linear(3, 4, true, gen, F64), {2, 3}, 30);
  expect_gradcheck(Linear(4, 3, false, gen, F64), {2, 1, 4}, 31);
}

TEST(Conv1x1, StoresA4DWeightAndMatchesReferenceLoop) {
  Generator gen(4);
  Conv1x1 conv(3, 2, true, gen, F64);
  EXPECT_EQ(conv.weight().shape(), (Shape{2, 3, 1, 1}));
  EXPECT_EQ(conv.weight_matrix().shape(), (Shape{2, 3}));
  EXPECT_EQ(conv.type_name(), "Conv1x1");
  const int64_t B = 2, C = 3, O = 2, H = 2, W = 3;
  const Variable x = randn({B, C, H, W}, gen);
  const Variable y = conv.forward(x);
  ASSERT_EQ(y.shape(), (Shape{B, O, H, W}));
  const auto xv = x.tensor().to_vector(), wv = conv.weight().tensor().to_vector(), bv = conv.bias().tensor().to_vector();
  std::vector<double> want(size_t(B * O * H * W));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t p = 0; p < H * W; ++p) {
        double acc = bv[size_t(o)];
        for (int64_t c = 0; c < C; ++c) acc += wv[size_t(o * C + c)] * xv[size_t((b * C + c) * H * W + p)];
        want[size_t((b * O + o) * H * W + p)] = acc;
      }
  expect_near(y.tensor().to_vector(), want);
  EXPECT_THAT(error_of([&] { conv.forward(randn({1, 2, 2, 2}, gen)); }), HasSubstr("expected 3 input features in dim 1"));
}

TEST(Conv1x1, Gradcheck) {
  Generator gen(5);
  expect_gradcheck(Conv1x1(3, 2, true, gen, F64), {2, 3, 2, 2}, 50);
}

// A toy adapter: the base output plus one; records the input shape it saw.
class AddOne : public LinearExtension {
 public:
  mutable Shape seen;
  Variable forward(const Linear& base, const Variable& x) const override {
    seen = x.shape();
    return add_scalar(base.base_forward(x), 1.0);
  }
};

TEST(LinearExtension, ForwardUsesItAndBaseForwardDoesNot) {
  Generator gen(6);
  Linear lin(3, 2, true, gen, F64);
  const Variable x = randn({4, 3}, gen);
  const auto base = lin.forward(x).tensor().to_vector();
  auto ext = std::make_shared<AddOne>();
  lin.set_extension(ext);
  EXPECT_EQ(lin.extension(), ext);
  const auto extended = lin.forward(x).tensor().to_vector();
  for (size_t i = 0; i < base.size(); ++i) EXPECT_DOUBLE_EQ(extended[i], base[i] + 1.0);
  EXPECT_EQ(lin.base_forward(x).tensor().to_vector(), base);
  lin.set_extension(nullptr);
  EXPECT_EQ(lin.forward(x).tensor().to_vector(), base);
}

TEST(LinearExtension, Conv1x1ExtensionSeesTheChannelLastView) {
  Generator gen(7);
  Conv1x1 conv(3, 2, true, gen, F64);
  const Variable x = randn({2, 3, 2, 5}, gen);
  const auto base = conv.forward(x).tensor().to_vector();
  auto ext = std::make_shared<AddOne>();
  conv.set_extension(ext);
  const Variable y = conv.forward(x);
  EXPECT_EQ(ext->seen, (Shape{2, 2, 5, 3}));
  EXPECT_EQ(y.shape(), (Shape{2, 2, 2, 5}));
  const auto extended = y.tensor().to_vector();
  for (size_t i = 0; i < base.size(); ++i) EXPECT_DOUBLE_EQ(extended[i], base[i] + 1.0);
}

TEST(LinearExtension, GradientFlowsThroughTheExtension) {
  Generator gen(8);
  Linear lin(3, 2, true, gen, F64);
  lin.set_extension(std::make_shared<AddOne>());
  expect_gradcheck(lin, {2, 3}, 80);
}

// ---- norms -------------------------------------------------------------------------------------

TEST(LayerNorm, ParametersAndGradcheck) {
  LayerNorm ln(4, 1e-5, true, F64);
  EXPECT_EQ(ln.weight().tensor().to_vector(), std::vector<double>(4, 1.0));
  EXPECT_EQ(ln.bias().tensor().to_vector(), std::vector<double>(4, 0.0));
  Generator gen(9);
  randomize(ln, gen);
  expect_gradcheck(ln, {2, 2, 4}, 90);
  LayerNorm plain(4, 1e-5, false, F64);
  EXPECT_TRUE(plain.parameters().empty());
  expect_gradcheck(plain, {3, 4}, 91);
}

TEST(LayerNorm, NormalisesTheLastDim) {
  Generator gen(10);
  LayerNorm ln(5, 1e-5, true, F64);
  const auto y = ln.forward(randn({3, 5}, gen)).tensor().to_vector();
  for (int r = 0; r < 3; ++r) {
    double m = 0, v = 0;
    for (int i = 0; i < 5; ++i) m += y[size_t(r * 5 + i)] / 5;
    for (int i = 0; i < 5; ++i) v += std::pow(y[size_t(r * 5 + i)] - m, 2) / 5;
    EXPECT_NEAR(m, 0.0, 1e-12);
    EXPECT_NEAR(v, 1.0, 1e-4);
  }
}

TEST(GroupNorm, MatchesReferenceLoop) {
  const int64_t N = 2, C = 4, G = 2, HW = 3;
  const double eps = 1e-6;
  GroupNorm gn(G, C, eps, true, F64);
  Generator gen(11);
  randomize(gn, gen);
  const Variable x = randn({N, C, 1, HW}, gen);
  const auto xv = x.tensor().to_vector(), w = gn.weight().tensor().to_vector(), b = gn.bias().tensor().to_vector();
  const int64_t per_group = (C / G) * HW;  // channels of the group × spatial
  std::vector<double> want(xv.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const size_t start = size_t((n * C + g * (C / G)) * HW);
      double mean = 0, var = 0;
      for (int64_t k = 0; k < per_group; ++k) mean += xv[start + size_t(k)] / double(per_group);
      for (int64_t k = 0; k < per_group; ++k) var += std::pow(xv[start + size_t(k)] - mean, 2) / double(per_group);
      for (int64_t k = 0; k < per_group; ++k) {
        const size_t c = size_t(g * (C / G) + k / HW);
        want[start + size_t(k)] = (xv[start + size_t(k)] - mean) / std::sqrt(var + eps) * w[c] + b[c];
      }
    }
  expect_near(gn.forward(x).tensor().to_vector(), want, 1e-10);
  EXPECT_THAT(error_of([&] { gn.forward(randn({1, 3, 2}, gen)); }), HasSubstr("expected input [N, 4, *]"));
  EXPECT_THAT(error_of([] { GroupNorm(3, 4); }), HasSubstr("4 channels cannot be split into 3 groups"));
}

TEST(GroupNorm, Gradcheck) {
  GroupNorm gn(2, 4, 1e-5, true, F64);
  Generator gen(12);
  randomize(gn, gen);
  expect_gradcheck(gn, {2, 4, 3}, 120);
}

TEST(Dropout, RejectsBadProbability) {
  EXPECT_THAT(error_of([] { Dropout(1.0); }), HasSubstr("[0, 1)"));
  Dropout d(0.0);
  Variable x(Tensor::ones({3}));
  EXPECT_EQ(d.forward(x).tensor().to_vector(), std::vector<double>(3, 1.0));
}

// ---- activations and FeedForward ------------------------------------------------------------------

TEST(GEGLU, MatchesReferenceLoopFirstHalfIsTheValue) {
  Generator gen(13);
  GEGLU geglu(3, 2, true, gen, F64);
  EXPECT_EQ(geglu.proj()->weight().shape(), (Shape{4, 3}));
  const Variable x = randn({2, 3}, gen);
  const auto z = affine_ref(x.tensor().to_vector(), geglu.proj()->weight().tensor().to_vector(),
                            geglu.proj()->bias().tensor().to_vector(), 3, 4);
  std::vector<double> want;
  for (int r = 0; r < 2; ++r)
    for (int o = 0; o < 2; ++o) want.push_back(z[size_t(r * 4 + o)] * gelu_ref(z[size_t(r * 4 + 2 + o)]));
  const Variable y = geglu.forward(x);
  EXPECT_EQ(y.shape(), (Shape{2, 2}));
  expect_near(y.tensor().to_vector(), want);
}

TEST(GEGLU, Gradcheck) {
  Generator gen(14);
  expect_gradcheck(GEGLU(3, 2, true, gen, F64), {2, 3}, 140);
}

TEST(GELU, ExactAndApproximateMatchTheirFormulas) {
  Generator gen(15);
  for (bool approximate : {false, true}) {
    GELU act(3, 2, approximate, true, gen, F64);
    const Variable x = randn({2, 3}, gen);
    const auto z = affine_ref(x.tensor().to_vector(), act.proj()->weight().tensor().to_vector(),
                              act.proj()->bias().tensor().to_vector(), 3, 2);
    std::vector<double> want;
    for (double v : z) want.push_back(approximate ? gelu_tanh_ref(v) : gelu_ref(v));
    expect_near(act.forward(x).tensor().to_vector(), want, 1e-10);
    expect_gradcheck(act, {2, 3}, approximate ? 151 : 150);
  }
}

TEST(FeedForward, DiffusersKeyNamesAndShapes) {
  FeedForward ff(3);  // geglu, mult 4: inner 12
  std::vector<std::pair<std::string, Shape>> got;
  for (const auto& [name, p] : ff.named_parameters()) got.emplace_back(name, p.shape());
  EXPECT_THAT(got, ElementsAre(std::make_pair(std::string("net.0.proj.weight"), Shape{24, 3}),
                               std::make_pair(std::string("net.0.proj.bias"), Shape{24}),
                               std::make_pair(std::string("net.2.weight"), Shape{3, 12}),
                               std::make_pair(std::string("net.2.bias"), Shape{3})));
  EXPECT_EQ(ff.net()->at(0)->type_name(), "GEGLU");
  EXPECT_EQ(ff.net()->at(1)->type_name(), "Dropout");
  EXPECT_EQ(ff.find_module("net.0.proj")->type_name(), "Linear");

  FeedForwardOptions o;
  o.dim = 4;
  o.dim_out = 2;
  o.inner_dim = 5;
  o.activation = "gelu-approximate";
  o.final_dropout = true;
  o.bias = false;
  FeedForward custom(o);
  std::vector<std::string> names;
  for (const auto& [name, p] : custom.named_parameters()) names.push_back(name + " " + p.str());
  EXPECT_THAT(names, ElementsAre("net.0.proj.weight Variable(Tensor(f32, cpu, [5, 4]), requires_grad)",
                                 "net.2.weight Variable(Tensor(f32, cpu, [2, 5]), requires_grad)"));
  EXPECT_EQ(custom.net()->size(), 4);
  EXPECT_EQ(custom.net()->at(3)->type_name(), "Dropout");
  EXPECT_EQ(custom.forward(Variable(Tensor::ones({3, 4}))).shape(), (Shape{3, 2}));
}

TEST(FeedForward, UnknownActivationIsAnErrorNamingIt) {
  EXPECT_THAT(error_of([] { FeedForward(4, 4, 4, "swish-ish"); }), HasSubstr("unknown activation 'swish-ish'"));
}

TEST(FeedForward, GradcheckEachActivation) {
  for (const std::string activation : {"geglu", "gelu", "gelu-approximate"}) {
    SCOPED_TRACE(activation);
    Generator gen(16);
    FeedForward ff(3, 2, 2, activation, 0.0, gen, F64);
    expect_gradcheck(ff, {2, 3}, 160);
  }
}

TEST(FeedForward, ComposesItsChildren) {
  Generator gen(17);
  FeedForward ff(3, 3, 2, "geglu", 0.0, gen, F64);
  const Variable x = randn({2, 3}, gen);
  const auto net = ff.net();
  const Variable want = net->at(2)->forward(net->at(0)->forward(x));
  EXPECT_EQ(ff.forward(x).tensor().to_vector(), want.tensor().to_vector());
}

TEST(FeedForward, ConvertedToF64PassesGradcheck) {
  Generator gen(18);
  FeedForward ff(3, 3, 1, "gelu", 0.0, gen);
  ff.to(F64);
  expect_gradcheck(ff, {1, 3}, 180);
}

}  // namespace
}  // namespace loom::nn
