// The backward engine: accumulation, graph release, no-grad, frozen inputs,
// un-broadcasting and its checks (ctest -L autograd).
#include <gtest/gtest.h>
#include <gmock/gmock.h>

#include "autograd/ops.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom {
namespace {

using loom::testing::error_of;
using ::testing::HasSubstr;

Variable leaf(const std::vector<double>& v, const Shape& s, bool grad = true) {
  return Variable(Tensor::from_values(v, s, DType::F64), grad);
}

TEST(Engine, ScalarBackwardDefaultsToOne) {
  Variable x = leaf({1, 2, 3}, {3});
  sum(x * x).backward();
  EXPECT_EQ(x.grad().to_vector(), (std::vector<double>{2, 4, 6}));
}

TEST(Engine, GradientsAccumulateAcrossBackwardCallsUntilZeroGrad) {
  Variable x = leaf({1, 2}, {2});
  sum(x * 3.0).backward();
  sum(x * 3.0).backward();
  EXPECT_EQ(x.grad().to_vector(), (std::vector<double>{6, 6}));
  x.zero_grad();
  EXPECT_FALSE(x.grad().defined());
  sum(x).backward();
  EXPECT_EQ(x.grad().to_vector(), (std::vector<double>{1, 1}));
}

TEST(Engine, DiamondGraphSumsBothPaths) {
  Variable x = leaf({2}, {1});
  Variable y = exp(x);
  Variable z = y * y + y;  // dz/dx = (2y + 1)·y
  z.backward(Tensor::ones({1}, DType::F64));
  const double ey = std::exp(2.0);
  EXPECT_NEAR(x.grad().item(), (2 * ey + 1) * ey, 1e-9);
}

TEST(Engine, FrozenInputGetsNoGradient) {
  Variable w = leaf({1, 2, 3, 4}, {2, 2}, /*grad=*/false);
  Variable x = leaf({1, 1}, {1, 2});
  sum(linear(x, w)).backward();
  EXPECT_FALSE(w.grad().defined());
  EXPECT_TRUE(x.grad().defined());
  EXPECT_EQ(x.grad().to_vector(), (std::vector<double>{4, 6}));
}

TEST(Engine, FrozenOnlyGraphRecordsNothing) {
  Variable a = leaf({1, 2}, {2}, false);
  Variable y = exp(a) * 2.0;
  EXPECT_FALSE(y.requires_grad());
  EXPECT_TRUE(y.is_leaf());
  EXPECT_THAT(error_of([&] { y.backward(); }), HasSubstr("does not require grad"));
}

TEST(Engine, NoGradGuardStopsRecordingAndRestores) {
  Variable x = leaf({1, 2}, {2});
  {
    NoGradGuard guard;
    Variable y = x * 2.0;
    EXPECT_FALSE(y.requires_grad());
    {
      NoGradGuard nested;
    }
    EXPECT_FALSE(GradMode::is_enabled());
  }
  EXPECT_TRUE(GradMode::is_enabled());
  EXPECT_TRUE((x * 2.0).requires_grad());
}

TEST(Engine, DetachCutsTheGraph) {
  Variable x = leaf({3}, {1});
  Variable y = x * x;
  Variable d = y.detach();
  EXPECT_FALSE(d.requires_grad());
  Variable z = sum(d * x);  // d is a constant 9
  z.backward();
  EXPECT_DOUBLE_EQ(x.grad().item(), 9.0);
}

TEST(Engine, SecondBackwardNeedsRetainGraph) {
  Variable x = leaf({1, 2}, {2});
  Variable y = sum(exp(x));
  y.backward(Tensor(), /*retain_graph=*/true);
  y.backward();  // allowed: the graph was retained
  EXPECT_NEAR(x.grad().to_vector()[0], 2 * std::exp(1.0), 1e-12);
  EXPECT_THAT(error_of([&] { y.backward(); }), HasSubstr("retain_graph"));
}

TEST(Engine, NonScalarOutputNeedsGradOutput) {
  Variable x = leaf({1, 2}, {2});
  Variable y = x * 2.0;
  EXPECT_THAT(error_of([&] { y.backward(); }), HasSubstr("grad_output is required"));
  EXPECT_THAT(error_of([&] { y.backward(Tensor::ones({3}, DType::F64)); }), HasSubstr("does not match"));
  EXPECT_THAT(error_of([&] { y.backward(Tensor::ones({2}, DType::F32)); }), HasSubstr("f32"));
}

TEST(Engine, BroadcastGradientsAreSummedToTheInputShape) {
  Variable a = leaf({1, 2, 3}, {3, 1});
  Variable b = leaf({10, 20}, {2});
  sum(a * b).backward();  // [3,1]·[2] -> [3,2]
  EXPECT_EQ(a.grad().shape(), (Shape{3, 1}));
  EXPECT_EQ(a.grad().to_vector(), (std::vector<double>{30, 30, 30}));
  EXPECT_EQ(b.grad().to_vector(), (std::vector<double>{6, 6}));
}

TEST(Engine, RuleReturningAWrongDtypeIsCaught) {
  Variable x = leaf({1, 2}, {2});
  Variable y = record("bad_rule", x.tensor(), {x}, [](const Tensor& g, const std::vector<bool>&) {
    return std::vector<Tensor>{g.to(DType::F32)};
  });
  EXPECT_THAT(error_of([&] { sum(y).backward(); }), HasSubstr("backward of bad_rule"));
}

TEST(Engine, RuleReturningAWrongShapeIsCaught) {
  Variable x = leaf({1, 2}, {2});
  Variable y = record("bad_shape", x.tensor(), {x}, [](const Tensor&, const std::vector<bool>&) {
    return std::vector<Tensor>{Tensor::ones({3}, DType::F64)};
  });
  EXPECT_THAT(error_of([&] { sum(y).backward(); }), HasSubstr("bad_shape"));
}

TEST(Engine, RulesAreNotAskedForUnneededInputs) {
  Variable x = leaf({1, 2}, {2});
  Variable frozen = leaf({3, 4}, {2}, false);
  std::vector<bool> seen;
  Variable y = record("probe", ops::mul(x.tensor(), frozen.tensor()), {x, frozen},
                      [&seen](const Tensor& g, const std::vector<bool>& needs) {
                        seen = needs;
                        return std::vector<Tensor>{g, Tensor()};
                      });
  sum(y).backward();
  EXPECT_EQ(seen, (std::vector<bool>{true, false}));
}

TEST(Engine, SetRequiresGradOnlyOnFloatingLeaves) {
  Variable x = leaf({1}, {1});
  Variable y = x * 2.0;
  EXPECT_THAT(error_of([&] { y.set_requires_grad(false); }), HasSubstr("only leaves"));
  Variable i(Tensor::zeros({2}, DType::I64));
  EXPECT_THAT(error_of([&] { i.set_requires_grad(true); }), HasSubstr("i64"));
}

TEST(Engine, DeepChainDoesNotOverflowTheStack) {
  Variable x = leaf({1}, {1});
  Variable y = x;
  for (int i = 0; i < 20000; ++i) y = y + 0.0;
  y.backward(Tensor::ones({1}, DType::F64));
  EXPECT_DOUBLE_EQ(x.grad().item(), 1.0);
}

TEST(Dropout, SameSeedSameMaskAndScaledKeep) {
  Variable x(Tensor::ones({1000}, DType::F64), true);
  Generator g1(42), g2(42);
  const std::vector<double> a = dropout(x, 0.25, true, g1).tensor().to_vector();
  const std::vector<double> b = dropout(x, 0.25, true, g2).tensor().to_vector();
  EXPECT_EQ(a, b);
  int dropped = 0;
  for (double v : a) {
    EXPECT_TRUE(v == 0.0 || std::abs(v - 1.0 / 0.75) < 1e-12);
    dropped += v == 0.0;
  }
  EXPECT_GT(dropped, 180);
  EXPECT_LT(dropped, 320);
  Generator g3(1);
  EXPECT_EQ(dropout(x, 0.25, false, g3).tensor().to_vector(), x.tensor().to_vector());
}

TEST(LayerNorm, MatchesReferenceValues) {
  Variable x = leaf({1, 2, 3, 4, 2, 2, 2, 2}, {2, 4});
  const std::vector<double> y = layer_norm(x, {4}).tensor().to_vector();
  // row 1: mean 2.5, var 1.25
  const double s = 1.0 / std::sqrt(1.25 + 1e-5);
  EXPECT_NEAR(y[0], -1.5 * s, 1e-12);
  EXPECT_NEAR(y[3], 1.5 * s, 1e-12);
  EXPECT_NEAR(y[5], 0.0, 1e-12);  // a constant row normalises to 0, not NaN
}

TEST(BadInput, OpsNameShapesOnMismatch) {
  Variable a = leaf({1, 2, 3, 4, 5, 6}, {2, 3});
  Variable b = leaf({1, 2, 3, 4}, {4});
  EXPECT_THAT(error_of([&] { add(a, b); }), HasSubstr("[2, 3]"));
  EXPECT_THAT(error_of([&] { matmul(a, a); }), HasSubstr("matmul"));
  EXPECT_THAT(error_of([&] { layer_norm(a, {4}); }), HasSubstr("layer_norm"));
  EXPECT_THAT(error_of([&] { group_norm(a, 4); }), HasSubstr("group_norm"));
  EXPECT_THAT(error_of([&] { mse_loss(a, b); }), HasSubstr("mse_loss"));
  EXPECT_THAT(error_of([&] { sum(a, {2}); }), HasSubstr("out of range"));
  EXPECT_THAT(error_of([&] { split(a, {1, 1}, 1); }), HasSubstr("split"));
}

}  // namespace
}  // namespace loom
