// optim/: every update against its closed form (written out here in plain
// doubles), state per parameter name and its round trip, clipping, schedules,
// the factories' errors, and one small end-to-end fit (ctest -L optim).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "autograd/ops.h"
#include "nn/linear.h"
#include "optim/optim.h"
#include "tensor/ops.h"
#include "tests/test_helpers.h"

namespace loom::optim {
namespace {

using loom::testing::error_of;
using ::testing::HasSubstr;
using Vec = std::vector<double>;

Variable param(const Vec& v) { return Variable(Tensor::from_values(v, {int64_t(v.size())}, DType::F64), true); }
Tensor t64(const Vec& v) { return Tensor::from_values(v, {int64_t(v.size())}, DType::F64); }

// Fixed gradients for steps 1..3 of a 3-element parameter.
const Vec kStart{1.0, -2.0, 0.5};
const std::vector<Vec> kGrads{{0.1, -0.3, 2.0}, {-0.4, 0.2, 1.5}, {0.3, 0.3, -0.7}};

void expect_near(const Vec& got, const Vec& want, double tol = 1e-12) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "element " << i;
}

// Runs `opt` for the three fixed gradients on parameter `p`, checking the
// parameter against `reference` (one scalar update per element) after each step.
void run_against(Optimizer& opt, const Variable& p,
                 const std::function<double(size_t elem, double value, double grad)>& reference) {
  Vec want = kStart;
  for (const Vec& g : kGrads) {
    p.set_grad(t64(g));
    opt.step();
    for (size_t e = 0; e < want.size(); ++e) want[e] = reference(e, want[e], g[e]);
    expect_near(p.tensor().to_vector(), want);
  }
}

// ---- SGD --------------------------------------------------------------------------------

TEST(SGD, PlainStepIsLrTimesGrad) {
  Variable p = param(kStart);
  SGD opt({{"w", p}}, SGDOptions{0.1});
  run_against(opt, p, [](size_t, double x, double g) { return x - 0.1 * g; });
  EXPECT_TRUE(opt.state_dict().empty());  // no momentum, no state
}

// PyTorch's buffer: d on the first step, then μ·buf + (1 − τ)·d.
struct MomentumRef {
  double lr, mu, damp, wd;
  bool nesterov;
  Vec buf;
  int steps = 0;
  double operator()(size_t e, double x, double g) {
    if (buf.empty()) buf.assign(3, 0.0);
    const double d = g + wd * x;
    buf[e] = (steps / 3 == 0) ? d : mu * buf[e] + (1 - damp) * d;
    ++steps;
    return x - lr * (nesterov ? d + mu * buf[e] : buf[e]);
  }
};

TEST(SGD, MomentumWithDampening) {
  Variable p = param(kStart);
  SGD opt({{"w", p}}, SGDOptions{0.1, 0.9, 0.25});
  MomentumRef ref{0.1, 0.9, 0.25, 0.0, false, {}};
  run_against(opt, p, std::ref(ref));
  auto state = opt.state_dict();
  ASSERT_EQ(state.count("w.momentum_buffer"), 1u);
  expect_near(state["w.momentum_buffer"].to_vector(), ref.buf);
}

TEST(SGD, Nesterov) {
  Variable p = param(kStart);
  SGD opt({{"w", p}}, SGDOptions{0.05, 0.8, 0.0, 0.0, true});
  MomentumRef ref{0.05, 0.8, 0.0, 0.0, true, {}};
  run_against(opt, p, std::ref(ref));
}

TEST(SGD, WeightDecayAddsL2TermToTheGradient) {
  Variable p = param(kStart);
  SGD opt({{"w", p}}, SGDOptions{0.1, 0.0, 0.0, 0.3});
  run_against(opt, p, [](size_t, double x, double g) { return x - 0.1 * (g + 0.3 * x); });
}

TEST(SGD, WeightDecayWithMomentum) {
  Variable p = param(kStart);
  SGD opt({{"w", p}}, SGDOptions{0.1, 0.9, 0.0, 0.01});
  MomentumRef ref{0.1, 0.9, 0.0, 0.01, false, {}};
  run_against(opt, p, std::ref(ref));
}

TEST(SGD, NesterovNeedsMomentumAndNoDampening) {
  EXPECT_THAT(error_of([] { SGD({{"w", param({1})}}, SGDOptions{0.1, 0.0, 0.0, 0.0, true}); }),
              HasSubstr("nesterov"));
  EXPECT_THAT(error_of([] { SGD({{"w", param({1})}}, SGDOptions{0.1, 0.9, 0.1, 0.0, true}); }),
              HasSubstr("dampening"));
}

// ---- Adam / AdamW ---------------------------------------------------------------------------

// Adam in plain doubles, per element: decoupled selects AdamW's decay.
struct AdamRef {
  double lr, b1, b2, eps, wd;
  bool decoupled;
  Vec m = Vec(3, 0.0), v = Vec(3, 0.0);
  int calls = 0;
  double operator()(size_t e, double x, double g) {
    const int t = calls++ / 3 + 1;
    if (decoupled) x *= 1 - lr * wd;
    else g += wd * x;
    m[e] = b1 * m[e] + (1 - b1) * g;
    v[e] = b2 * v[e] + (1 - b2) * g * g;
    const double mhat = m[e] / (1 - std::pow(b1, t)), vhat = v[e] / (1 - std::pow(b2, t));
    return x - lr * mhat / (std::sqrt(vhat) + eps);
  }
};

TEST(Adam, MatchesClosedForm) {
  Variable p = param(kStart);
  Adam opt({{"w", p}}, AdamOptions{0.01, 0.9, 0.999, 1e-8});
  AdamRef ref{0.01, 0.9, 0.999, 1e-8, 0.0, false};
  run_against(opt, p, std::ref(ref));
  EXPECT_EQ(opt.step_count("w"), 3);
  auto s = opt.state_dict();
  expect_near(s.at("w.exp_avg").to_vector(), ref.m);
  expect_near(s.at("w.exp_avg_sq").to_vector(), ref.v);
  EXPECT_EQ(s.at("w.step").dim(), 0);
  EXPECT_EQ(s.at("w.step").dtype(), DType::F64);
  EXPECT_EQ(s.at("w.step").item(), 3.0);
}

TEST(Adam, WeightDecayIsAnL2TermInTheGradient) {
  Variable p = param(kStart);
  Adam opt({{"w", p}}, AdamOptions{0.02, 0.8, 0.99, 1e-3, 0.1});
  AdamRef ref{0.02, 0.8, 0.99, 1e-3, 0.1, false};
  run_against(opt, p, std::ref(ref));
}

TEST(AdamW, DecoupledWeightDecay) {
  Variable p = param(kStart);
  AdamW opt({{"w", p}}, AdamWOptions{0.02, 0.8, 0.99, 1e-3, 0.1});
  AdamRef ref{0.02, 0.8, 0.99, 1e-3, 0.1, true};
  run_against(opt, p, std::ref(ref));
  EXPECT_EQ(opt.name(), "adamw");
}

TEST(AdamW, DefaultsArePyTorchs) {
  AdamWOptions w;
  EXPECT_EQ(w.weight_decay, 1e-2);
  EXPECT_EQ(w.lr, 1e-3);
  AdamOptions a;
  EXPECT_EQ(a.weight_decay, 0.0);
  EXPECT_EQ(a.beta1, 0.9);
  EXPECT_EQ(a.beta2, 0.999);
  EXPECT_EQ(a.eps, 1e-8);
}

TEST(Adam, StateKeepsTheParametersDtype) {
  Variable p(Tensor::from_values({1, 2}, {2}, DType::F32), true);
  Adam opt({{"w", p}});
  p.set_grad(Tensor::from_values({1, 1}, {2}, DType::F32));
  opt.step();
  EXPECT_EQ(opt.state_dict().at("w.exp_avg").dtype(), DType::F32);
  EXPECT_EQ(p.dtype(), DType::F32);
}

// ---- skipping, identity, zero_grad, lr ----------------------------------------------------

TEST(Optimizer, ParameterWithoutGradIsSkipped) {
  Variable a = param(kStart), b = param({5, 6});
  Adam opt({{"a", a}, {"b", b}}, AdamOptions{0.1});
  a.set_grad(t64({1, 1, 1}));
  opt.step();
  opt.step();
  EXPECT_EQ(b.tensor().to_vector(), (Vec{5, 6}));
  EXPECT_EQ(opt.state_dict().count("b.exp_avg"), 0u);
  EXPECT_EQ(opt.step_count("b"), 0);
  // b's first update uses its own step count (t = 1): |Δ| = lr·|ĝ/ĝ| = lr.
  a.zero_grad();
  b.set_grad(t64({2, -3}));
  const Vec a_before = a.tensor().to_vector();
  opt.step();
  EXPECT_EQ(a.tensor().to_vector(), a_before);
  EXPECT_EQ(opt.step_count("a"), 2);
  EXPECT_EQ(opt.step_count("b"), 1);
  expect_near(b.tensor().to_vector(), {5 - 0.1 * 2 / (2 + 1e-8), 6 + 0.1 * 3 / (3 + 1e-8)});
}

TEST(Optimizer, SgdMomentumSkipsParameterWithoutGrad) {
  Variable a = param({1}), b = param({2});
  SGD opt({{"a", a}, {"b", b}}, SGDOptions{0.1, 0.9});
  a.set_grad(t64({1}));
  opt.step();
  auto s = opt.state_dict();
  EXPECT_EQ(s.size(), 1u);
  EXPECT_EQ(s.count("a.momentum_buffer"), 1u);
  EXPECT_EQ(b.tensor().item(), 2.0);
}

TEST(Optimizer, UpdatesTheModulesOwnParameterInPlace) {
  auto lin = std::make_shared<nn::Linear>(3, 2);
  lin->to(DType::F64);
  const Variable w_before = lin->weight();
  const auto* impl = w_before.impl().get();
  const void* storage = w_before.tensor().storage().get();
  const Vec w0 = w_before.tensor().to_vector();
  auto opt = make_optimizer("sgd", trainable_parameters(*lin), 0.5);

  Variable x(Tensor::from_values({1, 2, 3}, {1, 3}, DType::F64));
  sum((*lin)(x)).backward();  // dL/dW[o][i] = x[i]
  opt->step();

  EXPECT_EQ(lin->weight().impl().get(), impl);
  EXPECT_EQ(lin->parameter("weight").tensor().storage().get(), storage);
  EXPECT_TRUE(lin->weight().is_leaf());
  EXPECT_FALSE(lin->weight().grad_fn());
  const Vec w1 = lin->weight().tensor().to_vector();
  for (size_t k = 0; k < w0.size(); ++k) EXPECT_NEAR(w1[k], w0[k] - 0.5 * double(k % 3 + 1), 1e-12);
  opt->zero_grad();
  EXPECT_FALSE(lin->weight().grad().defined());
  EXPECT_FALSE(lin->bias().grad().defined());
}

TEST(Optimizer, SetLrChangesTheNextStep) {
  Variable p = param({1});
  SGD opt({{"w", p}}, SGDOptions{0.1});
  opt.set_lr(0.25);
  EXPECT_EQ(opt.lr(), 0.25);
  EXPECT_EQ(opt.options().lr, 0.25);
  p.set_grad(t64({2}));
  opt.step();
  EXPECT_DOUBLE_EQ(p.tensor().item(), 0.5);
  EXPECT_THAT(error_of([&] { opt.set_lr(-1); }), HasSubstr("learning rate"));
}

TEST(Optimizer, ConstructionRejectsBadParameterLists) {
  Variable frozen1 = param({1}), frozen2 = param({2}), ok = param({3});
  frozen1.set_requires_grad(false);
  frozen2.set_requires_grad(false);
  const std::string e = error_of([&] { Adam({{"ok", ok}, {"blk.f1", frozen1}, {"blk.f2", frozen2}}); });
  EXPECT_THAT(e, HasSubstr("do not require grad"));
  EXPECT_THAT(e, HasSubstr("blk.f1, blk.f2"));
  EXPECT_THAT(error_of([&] { SGD({}); }), HasSubstr("empty parameter list"));
  EXPECT_THAT(error_of([&] { SGD({{"a", ok}, {"a", param({1})}}); }), HasSubstr("'a' given twice"));
  EXPECT_THAT(error_of([&] { SGD({{"a", ok}, {"b", ok}}); }), HasSubstr("same Variable"));
  Variable nonleaf = ok * 2.0;
  EXPECT_THAT(error_of([&] { SGD({{"n", nonleaf}}); }), HasSubstr("not a leaf"));
  EXPECT_EQ(trainable({{"ok", ok}, {"f", frozen1}}).size(), 1u);
}

// ---- state_dict -------------------------------------------------------------------------------

// Two optimizers on equal parameters: the second loads the first's state after
// two steps; both take a third step and must agree exactly.
void expect_round_trip(const std::string& name) {
  Variable p1 = param(kStart), q1 = param({0.3, -0.2});
  auto first = make_optimizer(name, {{"blk.w", p1}, {"blk.b", q1}}, OptimizerConfig{0.05, 0.01, 0.9});
  for (int s = 0; s < 2; ++s) {
    p1.set_grad(t64(kGrads[s]));
    q1.set_grad(t64({0.5, -1.0 + s}));
    first->step();
  }
  Variable p2(p1.tensor().clone(), true), q2(q1.tensor().clone(), true);
  auto second = make_optimizer(name, {{"blk.w", p2}, {"blk.b", q2}}, OptimizerConfig{0.05, 0.01, 0.9});
  second->load_state_dict(first->state_dict());
  for (auto& [v, q] : {std::pair{p1, q1}, std::pair{p2, q2}}) {
    v.set_grad(t64(kGrads[2]));
    q.set_grad(t64({1.0, 2.0}));
  }
  first->step();
  second->step();
  EXPECT_EQ(p1.tensor().to_vector(), p2.tensor().to_vector()) << name;
  EXPECT_EQ(q1.tensor().to_vector(), q2.tensor().to_vector()) << name;
  auto s1 = first->state_dict(), s2 = second->state_dict();
  ASSERT_EQ(s1.size(), s2.size());
  for (const auto& [k, t] : s1) EXPECT_EQ(t.to_vector(), s2.at(k).to_vector()) << k;
}

TEST(StateDict, RoundTripContinuesIdentically) {
  for (const char* name : {"sgd", "adam", "adamw"}) expect_round_trip(name);
}

TEST(StateDict, KeysArePerParameterName) {
  Variable p = param({1, 2});
  Adam opt({{"down.lora_A.weight", p}});
  p.set_grad(t64({1, 1}));
  opt.step();
  std::vector<std::string> keys;
  for (const auto& kv : opt.state_dict()) keys.push_back(kv.first);
  EXPECT_EQ(keys, (std::vector<std::string>{"down.lora_A.weight.exp_avg", "down.lora_A.weight.exp_avg_sq",
                                            "down.lora_A.weight.step"}));
}

TEST(StateDict, LoadErrorsNameTheKey) {
  Variable p = param({1, 2});
  Adam opt({{"w", p}});
  p.set_grad(t64({1, 1}));
  opt.step();
  const auto good = opt.state_dict();

  auto missing = good;
  missing.erase("w.exp_avg_sq");
  EXPECT_THAT(error_of([&] { opt.load_state_dict(missing); }), HasSubstr("missing key 'w.exp_avg_sq'"));

  auto wrong_shape = good;
  wrong_shape["w.exp_avg"] = t64({1, 2, 3});
  const std::string e = error_of([&] { opt.load_state_dict(wrong_shape); });
  EXPECT_THAT(e, HasSubstr("'w.exp_avg'"));
  EXPECT_THAT(e, HasSubstr("[3]"));
  EXPECT_THAT(e, HasSubstr("[2]"));

  auto unknown_param = good;
  unknown_param["v.exp_avg"] = t64({0, 0});
  EXPECT_THAT(error_of([&] { opt.load_state_dict(unknown_param); }), HasSubstr("'v.exp_avg'"));

  auto unknown_field = good;
  unknown_field["w.momentum_buffer"] = t64({0, 0});
  EXPECT_THAT(error_of([&] { opt.load_state_dict(unknown_field); }), HasSubstr("'w.momentum_buffer'"));

  auto bad_step = good;
  bad_step["w.step"] = Tensor::scalar(1.5, DType::F64);
  EXPECT_THAT(error_of([&] { opt.load_state_dict(bad_step); }), HasSubstr("'w.step'"));

  // A failed load changed nothing.
  EXPECT_EQ(opt.step_count("w"), 1);
  EXPECT_EQ(opt.state_dict().at("w.exp_avg").to_vector(), good.at("w.exp_avg").to_vector());
}

// ---- clip_grad_norm ---------------------------------------------------------------------------------

TEST(ClipGradNorm, ScalesAboveTheMax) {
  Variable a = param({3, 4}), b = param({12}), none = param({7});
  a.set_grad(t64({3, 4}));
  b.set_grad(t64({12}));
  const double total = clip_grad_norm(std::vector<Variable>{a, b, none}, 6.5);
  EXPECT_DOUBLE_EQ(total, 13.0);  // √(9 + 16 + 144)
  const double coef = 6.5 / (13.0 + 1e-6);
  expect_near(a.grad().to_vector(), {3 * coef, 4 * coef}, 1e-14);
  expect_near(b.grad().to_vector(), {12 * coef}, 1e-14);
  EXPECT_FALSE(none.grad().defined());
}

TEST(ClipGradNorm, LeavesGradsUnderTheMax) {
  Variable a = param({3, 4});
  const Tensor g = t64({3, 4});
  a.set_grad(g);
  EXPECT_DOUBLE_EQ(clip_grad_norm(NamedParameters{{"a", a}}, 5.5), 5.0);
  EXPECT_EQ(a.grad().to_vector(), (Vec{3, 4}));
  EXPECT_EQ(clip_grad_norm(std::vector<Variable>{param({1})}, 1.0), 0.0);  // no grads at all
}

TEST(ClipGradNorm, NanNormPropagatesAsInPyTorch) {
  Variable a = param({1, 2});
  a.set_grad(t64({NAN, 1}));
  EXPECT_TRUE(std::isnan(clip_grad_norm(std::vector<Variable>{a}, 1.0)));
  for (double g : a.grad().to_vector()) EXPECT_TRUE(std::isnan(g));
  EXPECT_THAT(error_of([&] { clip_grad_norm(std::vector<Variable>{a}, -1.0); }), HasSubstr("max_norm"));
}

// ---- schedules --------------------------------------------------------------------------------------------

TEST(Schedule, Constant) {
  LRSchedule s = make_schedule("constant", 10, 100);
  for (int64_t t : {0, 5, 10, 1000}) EXPECT_EQ(s.factor(t), 1.0);
}

TEST(Schedule, ConstantWithWarmup) {
  LRSchedule s = make_schedule("constant_with_warmup", 10, 0);
  EXPECT_EQ(s.factor(0), 0.0);
  EXPECT_DOUBLE_EQ(s.factor(3), 0.3);
  EXPECT_EQ(s.factor(10), 1.0);
  EXPECT_EQ(s.factor(500), 1.0);
  EXPECT_EQ(make_schedule("constant_with_warmup", 0, 0).factor(0), 1.0);
}

TEST(Schedule, Linear) {
  LRSchedule s = make_schedule("linear", 10, 100);
  EXPECT_DOUBLE_EQ(s.factor(5), 0.5);
  EXPECT_DOUBLE_EQ(s.factor(10), 1.0);
  EXPECT_DOUBLE_EQ(s.factor(55), 0.5);
  EXPECT_DOUBLE_EQ(s.factor(91), 9.0 / 90.0);
  EXPECT_EQ(s.factor(100), 0.0);
  EXPECT_EQ(s.factor(150), 0.0);
}

TEST(Schedule, Cosine) {
  LRSchedule s = make_schedule("cosine", 10, 110);
  const double pi = std::acos(-1.0);
  EXPECT_DOUBLE_EQ(s.factor(4), 0.4);
  EXPECT_DOUBLE_EQ(s.factor(10), 1.0);
  EXPECT_NEAR(s.factor(35), 0.5 * (1 + std::cos(pi * 0.25)), 1e-15);
  EXPECT_NEAR(s.factor(60), 0.5, 1e-15);
  EXPECT_NEAR(s.factor(110), 0.0, 1e-15);
  EXPECT_NEAR(s.factor(130), 0.5 * (1 + std::cos(pi * 1.2)), 1e-15);  // past the end, as diffusers
}

TEST(Schedule, ApplySetsTheOptimizersLr) {
  Variable p = param({1});
  auto opt = make_optimizer("adamw", {{"w", p}}, 1e-3);
  make_schedule("linear", 10, 100).apply(*opt, 55, 2e-4);
  EXPECT_DOUBLE_EQ(opt->lr(), 1e-4);
}

TEST(Schedule, BadArgumentsThrow) {
  EXPECT_THAT(error_of([] { make_schedule("linear", 10, 0); }), HasSubstr("total_steps"));
  EXPECT_THAT(error_of([] { make_schedule("cosine", -1, 10); }), HasSubstr("warmup_steps"));
  EXPECT_THAT(error_of([] { make_schedule("constant", 0, 0).factor(-1); }), HasSubstr("step"));
}

// ---- names -------------------------------------------------------------------------------------------------

TEST(Factory, UnknownNamesListTheValidOnes) {
  const std::string e = error_of([] { make_optimizer("rmsprop", {{"w", param({1})}}, 0.1); });
  EXPECT_THAT(e, HasSubstr("'rmsprop'"));
  EXPECT_THAT(e, HasSubstr("sgd, adam, adamw"));
  const std::string s = error_of([] { make_schedule("polynomial", 0, 10); });
  EXPECT_THAT(s, HasSubstr("'polynomial'"));
  EXPECT_THAT(s, HasSubstr("constant, constant_with_warmup, linear, cosine"));
}

TEST(Factory, BuildsEachKindWithItsDefaults) {
  EXPECT_EQ(make_optimizer("SGD", {{"w", param({1})}}, 0.1)->name(), "sgd");
  auto adam = make_optimizer("adam", {{"w", param({1})}}, 0.1);
  EXPECT_EQ(dynamic_cast<Adam&>(*adam).options().weight_decay, 0.0);
  auto adamw = make_optimizer("AdamW", {{"w", param({1})}}, 0.1);
  EXPECT_EQ(dynamic_cast<AdamW&>(*adamw).options().weight_decay, 1e-2);
  OptimizerConfig c;
  c.weight_decay = 0.0;
  EXPECT_EQ(dynamic_cast<AdamW&>(*make_optimizer("adamw", {{"w", param({1})}}, c)).options().weight_decay, 0.0);
}

// ---- end to end ---------------------------------------------------------------------------------------------

TEST(EndToEnd, AdamFitsATarget) {
  Variable w = param({0.0, 0.0, 0.0, 0.0});
  const Variable target(t64({1.5, -2.0, 0.25, 3.0}));
  Adam opt({{"w", w}}, AdamOptions{0.1});
  double loss = 0;
  for (int t = 0; t < 200; ++t) {
    opt.zero_grad();
    Variable diff = w - target;
    Variable l = sum(diff * diff);
    loss = l.tensor().item();
    l.backward();
    opt.step();
  }
  EXPECT_LT(loss, 1e-6);
  const Vec got = w.tensor().to_vector(), want = target.tensor().to_vector();
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-3);
}

}  // namespace
}  // namespace loom::optim
