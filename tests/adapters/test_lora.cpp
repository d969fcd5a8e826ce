// LoRA adapters (SPEC §4, adapters/lora.h): scaling, initialisation, attaching, bit-exact identities, adapter sums.
//
// The other LoRA cases: per-block weights, patterns, fuse / unfuse and Conv1x1 targets in
// test_lora_patterns_fuse.cpp; gradient checks and CUDA in test_lora_gradcheck.cpp (ctest -L adapters).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "adapters/lora.h"
#include "attention/transformer.h"
#include "autograd/ops.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::adapters {
namespace {

using ::testing::HasSubstr;
using loom::testing::lora::all_targets;
using loom::testing::lora::Inputs;
using loom::testing::lora::message_of;
using loom::testing::lora::minus;
using loom::testing::lora::random_inputs;
using loom::testing::lora::randomize_up;
using loom::testing::lora::rel_diff;
using loom::testing::lora::run;
using loom::testing::lora::tiny_model;

constexpr DType F64 = DType::F64;
constexpr DType F32 = DType::F32;

// A module with one Linear child "proj": the adapted projection seen on its own.
class OneLinear : public nn::Module {
 public:
  OneLinear(int64_t in, int64_t out, bool bias, Generator& gen, DType dtype) {
    proj = register_module("proj", std::make_shared<nn::Linear>(in, out, bias, gen, dtype));
  }
  std::shared_ptr<nn::Linear> proj;
};

// ---- scaling and initialisation ---------------------------------------------------------------------

TEST(LoraScale, ModuleScaleConventions) {
  LoraModule m;
  m.rank = 4;
  EXPECT_EQ(m.scale(), 1.0);  // no alpha: 1
  m.alpha = 8.0;
  EXPECT_EQ(m.scale(), 2.0);  // alpha / r
  m.use_rslora = true;
  EXPECT_EQ(m.scale(), 4.0);  // alpha / √r
  m.rank = 2;
  m.alpha = 3.0;
  EXPECT_DOUBLE_EQ(m.scale(), 3.0 / std::sqrt(2.0));
}

// y − W·x − b == w·s·B·(A·x) on one projection, for each scaling convention.
TEST(LoraScale, OutputDeltaIsWeightTimesScaleTimesBAx) {
  struct Case {
    int64_t rank;
    std::optional<double> alpha;
    bool rslora;
    double weight;
    double expected_scale;
  };
  const std::vector<Case> cases = {
      {4, std::nullopt, false, 1.0, 1.0},            // no alpha: s = 1
      {4, 8.0, false, 1.0, 2.0},                     // alpha / r
      {4, 8.0, true, 1.0, 4.0},                      // alpha / √r
      {2, 3.0, true, 0.5, 3.0 / std::sqrt(2.0)},     // rsLoRA with a user weight
      {3, 1.5, false, -2.0, 0.5},                    // negative weights are allowed
      {4, std::nullopt, true, 1.0, 1.0},             // rsLoRA without alpha: still 1
  };
  for (const Case& c : cases) {
    SCOPED_TRACE("rank " + std::to_string(c.rank) + " alpha " + (c.alpha ? std::to_string(*c.alpha) : "none") +
                 (c.rslora ? " rslora" : "") + " weight " + std::to_string(c.weight));
    Generator gen(3);
    auto model = std::make_shared<OneLinear>(5, 6, true, gen, F64);
    LoraSet set(model);
    LoraConfig config;
    config.rank = c.rank;
    config.alpha = c.alpha;
    config.use_rslora = c.rslora;
    config.targets = {"proj"};
    Generator lora_gen(7);
    LoraAdapter& a = set.add("a", config, lora_gen);
    randomize_up(a, lora_gen, 0.5);
    set.set_weight("a", c.weight);
    const LoraModule& m = a.module("proj");
    EXPECT_DOUBLE_EQ(m.scale(), c.expected_scale);
    EXPECT_EQ(a.effective_weight("proj"), c.weight);

    const Tensor x = Tensor::randn({2, 3, 5}, gen, F64);
    NoGradGuard no_grad;
    const std::vector<double> y = model->proj->forward(Variable(x)).tensor().to_vector();
    const std::vector<double> base = model->proj->base_forward(Variable(x)).tensor().to_vector();
    const std::vector<double> expected =
        ops::mul_scalar(ops::linear(ops::linear(x, m.down.tensor()), m.up.tensor()), c.weight * c.expected_scale)
            .to_vector();
    EXPECT_LE(rel_diff(minus(y, base), expected), 1e-12);
  }
}

TEST(LoraInit, DownIsNormalWithStdOneOverRankAndUpIsZero) {
  Generator gen(11);
  auto model = std::make_shared<OneLinear>(2000, 8, true, gen, F32);
  LoraSet set(model);
  LoraConfig config;
  config.rank = 4;
  config.targets = {"proj"};
  const LoraAdapter& a = set.add("a", config);
  const LoraModule& m = a.modules().at("proj");
  EXPECT_EQ(m.rank, 4);
  EXPECT_EQ(m.down.shape(), (Shape{4, 2000}));
  EXPECT_EQ(m.up.shape(), (Shape{8, 4}));
  EXPECT_EQ(m.down.dtype(), F32);
  EXPECT_EQ(m.up.dtype(), F32);
  EXPECT_TRUE(m.down.requires_grad());
  EXPECT_TRUE(m.up.requires_grad());
  const std::vector<double> down = m.down.tensor().to_vector();
  double mean = 0.0, sq = 0.0;
  for (double v : down) mean += v;
  mean /= double(down.size());
  for (double v : down) sq += (v - mean) * (v - mean);
  const double std = std::sqrt(sq / double(down.size() - 1));
  EXPECT_NEAR(std, 0.25, 0.25 * 0.05) << "A ~ N(0, std = 1/r)";
  EXPECT_NEAR(mean, 0.0, 0.02);
  for (double v : m.up.tensor().to_vector()) EXPECT_EQ(v, 0.0);
  // add() freezes the base model.
  for (const auto& [name, p] : model->named_parameters()) EXPECT_FALSE(p.requires_grad()) << name;
}

// ---- attaching ---------------------------------------------------------------------------------------

TEST(LoraSet, DefaultTargetsAndParameterNames) {
  auto model = tiny_model(1, F32);
  LoraSet set(model);
  const LoraAdapter& a = set.add("style", LoraConfig{});
  std::set<std::string> paths;
  for (const auto& [path, m] : a.modules()) paths.insert(path);
  const std::set<std::string> expected = {
      "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_v",
      "transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.attn2.to_q", "transformer_blocks.0.attn2.to_k",
      "transformer_blocks.0.attn2.to_v", "transformer_blocks.0.attn2.to_out.0"};
  EXPECT_EQ(paths, expected);
  // attn2.to_k reads the context (cross_attention_dim 3): A (4, 3), B (4, 4) with the default rank 4.
  EXPECT_EQ(a.modules().at("transformer_blocks.0.attn2.to_k").down.shape(), (Shape{4, 3}));
  EXPECT_EQ(a.modules().at("transformer_blocks.0.attn2.to_k").up.shape(), (Shape{4, 4}));

  std::set<std::string> names;
  for (const auto& [name, v] : a.named_parameters()) names.insert(name);
  EXPECT_TRUE(names.count("transformer_blocks.0.attn1.to_q.lora_A.weight"));
  EXPECT_TRUE(names.count("transformer_blocks.0.attn2.to_out.0.lora_B.weight"));
  EXPECT_EQ(names.size(), 16u);
  const auto trainable = set.trainable_parameters();
  EXPECT_EQ(trainable.size(), 16u);
  for (const auto& [name, v] : trainable) {
    EXPECT_EQ(name.rfind("style.transformer_blocks.0.attn", 0), 0u) << name;
    EXPECT_TRUE(v.requires_grad()) << name;
  }
  for (const auto& [name, p] : model->named_parameters()) EXPECT_FALSE(p.requires_grad()) << name;
  EXPECT_EQ(set.names(), std::vector<std::string>{"style"});
  EXPECT_TRUE(set.has("style"));
  EXPECT_FALSE(set.has("other"));
  EXPECT_THAT(message_of([&] { set.adapter("other"); }), HasSubstr("other"));
  EXPECT_THAT(message_of([&] { set.add("style", LoraConfig{}); }), HasSubstr("style"));  // duplicate name
}

TEST(LoraSet, AddWithTargetsMatchingNothingThrowsNamingThem) {
  auto model = tiny_model(1, F32);
  LoraSet set(model);
  LoraConfig config;
  config.targets = {"to_nothing", "attn9.to_q"};
  const std::string msg = message_of([&] { set.add("a", config); });
  EXPECT_THAT(msg, HasSubstr("to_nothing"));
  EXPECT_THAT(msg, HasSubstr("attn9.to_q"));
  EXPECT_FALSE(set.has("a"));
  // A target matches a whole path component: "o_q" is not "to_q".
  config.targets = {"o_q"};
  EXPECT_THAT(message_of([&] { set.add("b", config); }), HasSubstr("o_q"));
}

TEST(LoraSet, AddFromWeightsWithWrongShapeThrowsNamingPathAndShapes) {
  auto model = tiny_model(1, F32);
  LoraSet set(model);
  const std::string path = "transformer_blocks.0.attn1.to_q";  // Linear 4 -> 4
  {
    std::map<std::string, LoraModule> modules;
    LoraModule m;
    m.down = Variable(Tensor::zeros({2, 5}));  // in is 4
    m.up = Variable(Tensor::zeros({4, 2}));
    modules[path] = m;
    const std::string msg = message_of([&] { set.add_from_weights("bad_down", modules); });
    EXPECT_THAT(msg, HasSubstr(path));
    EXPECT_THAT(msg, HasSubstr("[2, 5]"));
    EXPECT_THAT(msg, HasSubstr("[2, 4]"));
  }
  {
    std::map<std::string, LoraModule> modules;
    LoraModule m;
    m.down = Variable(Tensor::zeros({2, 4}));
    m.up = Variable(Tensor::zeros({7, 2}));  // out is 4
    modules[path] = m;
    const std::string msg = message_of([&] { set.add_from_weights("bad_up", modules); });
    EXPECT_THAT(msg, HasSubstr(path));
    EXPECT_THAT(msg, HasSubstr("[7, 2]"));
    EXPECT_THAT(msg, HasSubstr("[4, 2]"));
  }
  {
    std::map<std::string, LoraModule> modules;
    LoraModule m;
    m.down = Variable(Tensor::zeros({2, 4}));
    m.up = Variable(Tensor::zeros({4, 2}));
    modules["transformer_blocks.3.attn1.to_q"] = m;
    EXPECT_THAT(message_of([&] { set.add_from_weights("bad_path", modules); }),
                HasSubstr("transformer_blocks.3.attn1.to_q"));
  }
  EXPECT_TRUE(set.names().empty());
}

TEST(LoraSet, AddFromWeightsUsesTheGivenWeightsAndScale) {
  auto model = tiny_model(2, F64);
  const Inputs in = random_inputs(3, F64);
  const std::vector<double> base = run(*model, in.x, in.ctx);
  LoraSet set(model);
  Generator gen(4);
  std::map<std::string, LoraModule> modules;
  LoraModule m;
  m.down = Variable(Tensor::randn({2, 3}, gen, F32));  // f32 weights: converted to the model's f64
  m.up = Variable(Tensor::randn({4, 2}, gen, F32));
  m.alpha = 1.0;
  modules["transformer_blocks.0.attn2.to_k"] = m;
  LoraAdapter& a = set.add_from_weights("file", modules);
  const LoraModule& got = a.module("transformer_blocks.0.attn2.to_k");
  EXPECT_EQ(got.rank, 2);
  EXPECT_EQ(got.down.dtype(), F64);
  EXPECT_EQ(got.up.dtype(), F64);
  EXPECT_DOUBLE_EQ(got.scale(), 0.5);
  EXPECT_EQ(got.down.tensor().to_vector(), m.down.tensor().to_vector());
  EXPECT_EQ(got.up.tensor().to_vector(), m.up.tensor().to_vector());
  EXPECT_NE(run(*model, in.x, in.ctx), base);
  EXPECT_THAT(message_of([&] { a.module("transformer_blocks.0.attn2.to_v"); }),
              HasSubstr("transformer_blocks.0.attn2.to_v"));
}

// ---- bit-exact identities ----------------------------------------------------------------------------

TEST(LoraIdentity, ZeroUpEqualsBaseBitForBit) {
  for (DType dtype : {F32, F64}) {
    auto model = tiny_model(5, dtype);
    const Inputs in = random_inputs(6, dtype);
    const std::vector<double> base = run(*model, in.x, in.ctx);
    LoraSet set(model);
    LoraConfig config;
    config.targets = all_targets();
    config.alpha = 8.0;
    set.add("fresh", config);  // B = 0
    EXPECT_EQ(run(*model, in.x, in.ctx), base) << dtype;
  }
}

TEST(LoraIdentity, WeightZeroEqualsBaseBitForBitEvenWithNonZeroUp) {
  auto model = tiny_model(5, F32);
  const Inputs in = random_inputs(6, F32);
  const std::vector<double> base = run(*model, in.x, in.ctx);
  LoraSet set(model);
  LoraConfig config;
  config.targets = all_targets();
  Generator gen(8);
  randomize_up(set.add("a", config, gen), gen);
  const std::vector<double> adapted = run(*model, in.x, in.ctx);
  EXPECT_NE(adapted, base);
  set.set_weight("a", 0.0);
  EXPECT_EQ(run(*model, in.x, in.ctx), base);
  set.set_weight("a", 1.0);
  EXPECT_EQ(run(*model, in.x, in.ctx), adapted);
  // A block weight of 0 on every adapted path does the same (patterns are whole path components).
  set.set_block_weight("a", "transformer_blocks", 0.0);
  set.set_block_weight("a", "proj_in", 0.0);
  set.set_block_weight("a", "proj_out", 0.0);
  EXPECT_EQ(run(*model, in.x, in.ctx), base);
}

TEST(LoraIdentity, DisableEqualsBaseBitForBit) {
  auto model = tiny_model(5, F32);
  const Inputs in = random_inputs(6, F32);
  const std::vector<double> base = run(*model, in.x, in.ctx);
  LoraSet set(model);
  LoraConfig config;
  config.targets = all_targets();
  Generator gen(8);
  randomize_up(set.add("a", config, gen), gen);
  randomize_up(set.add("b", config, gen), gen);
  const std::vector<double> both = run(*model, in.x, in.ctx);
  EXPECT_NE(both, base);
  set.disable("a");
  set.disable("b");
  EXPECT_FALSE(set.adapter("a").enabled());
  EXPECT_EQ(run(*model, in.x, in.ctx), base);
  EXPECT_TRUE(set.trainable_parameters().empty());  // disabled adapters do not train
  set.enable("a");
  set.enable("b");
  EXPECT_EQ(run(*model, in.x, in.ctx), both);
}

TEST(LoraIdentity, RemoveRestoresBaseOutputBitForBit) {
  auto model = tiny_model(5, F32);
  const Inputs in = random_inputs(6, F32);
  const std::vector<double> base = run(*model, in.x, in.ctx);
  LoraSet set(model);
  LoraConfig config;
  config.targets = all_targets();
  Generator gen(8);
  randomize_up(set.add("a", config, gen), gen);
  const std::vector<double> only_a = run(*model, in.x, in.ctx);
  randomize_up(set.add("b", config, gen), gen);
  EXPECT_NE(run(*model, in.x, in.ctx), only_a);
  set.remove("b");
  EXPECT_EQ(run(*model, in.x, in.ctx), only_a);
  EXPECT_EQ(set.names(), std::vector<std::string>{"a"});
  set.remove("a");
  EXPECT_EQ(run(*model, in.x, in.ctx), base);
  for (const auto& [path, module] : model->named_modules()) {
    if (auto linear = std::dynamic_pointer_cast<nn::Linear>(module)) {
      EXPECT_EQ(linear->extension(), nullptr) << path << " keeps an extension after remove";
    }
  }
  EXPECT_THAT(message_of([&] { set.remove("a"); }), HasSubstr("a"));
}

TEST(LoraIdentity, DestroyingTheSetDetachesTheAdapters) {
  auto model = tiny_model(5, F32);
  const Inputs in = random_inputs(6, F32);
  const std::vector<double> base = run(*model, in.x, in.ctx);
  {
    LoraSet set(model);
    Generator gen(8);
    randomize_up(set.add("a", LoraConfig{}, gen), gen);
    EXPECT_NE(run(*model, in.x, in.ctx), base);
  }
  EXPECT_EQ(run(*model, in.x, in.ctx), base);
  {
    LoraSet set(model);  // fused when destroyed: the base weights come back too
    Generator gen(8);
    randomize_up(set.add("a", LoraConfig{}, gen), gen);
    set.fuse();
  }
  EXPECT_EQ(run(*model, in.x, in.ctx), base);
}

// ---- several adapters -----------------------------------------------------------------------------------

// On one projection the terms add: y(a+b) − base == (y(a) − base) + (y(b) − base).
TEST(LoraSum, TwoAdaptersAddOnAProjection) {
  Generator gen(21);
  auto model = std::make_shared<OneLinear>(5, 6, true, gen, F64);
  LoraSet set(model);
  LoraConfig ca;
  ca.rank = 2, ca.alpha = 4.0, ca.targets = {"proj"};
  LoraConfig cb;
  cb.rank = 3, cb.use_rslora = true, cb.alpha = 2.0, cb.targets = {"proj"};
  randomize_up(set.add("a", ca, gen), gen);
  randomize_up(set.add("b", cb, gen), gen);
  set.set_weight("b", 0.7);
  const Tensor x = Tensor::randn({4, 5}, gen, F64);
  auto y = [&] {
    NoGradGuard no_grad;
    return model->proj->forward(Variable(x)).tensor().to_vector();
  };
  const std::vector<double> both = y();
  set.disable("b");
  const std::vector<double> only_a = y();
  set.enable("b");
  set.disable("a");
  const std::vector<double> only_b = y();
  set.disable("b");
  const std::vector<double> base = y();
  std::vector<double> sum(base.size());
  for (size_t i = 0; i < base.size(); ++i) sum[i] = (only_a[i] - base[i]) + (only_b[i] - base[i]);
  EXPECT_LE(rel_diff(minus(both, base), sum), 1e-12);
}

// Through the whole (nonlinear) model, two adapters act as one adapter whose A stacks
// both A's and whose B stacks w·s·B of each (rank r_a + r_b, scale 1).
TEST(LoraSum, TwoAdaptersEqualTheirStackedAdapterInTheModel) {
  auto model = tiny_model(22, F64);
  auto twin = tiny_model(22, F64);
  const Inputs in = random_inputs(23, F64);
  LoraSet set(model);
  LoraConfig ca;
  ca.rank = 2, ca.alpha = 4.0, ca.targets = all_targets();
  LoraConfig cb;
  cb.rank = 3, cb.targets = {"to_k", "to_v", "ff.net.2"};  // no alpha: s = 1
  Generator gen(24);
  LoraAdapter& a = set.add("a", ca, gen);
  LoraAdapter& b = set.add("b", cb, gen);
  randomize_up(a, gen);
  randomize_up(b, gen);
  set.set_weight("b", -0.6);
  const std::vector<double> both = run(*model, in.x, in.ctx);

  std::map<std::string, LoraModule> stacked;
  for (const auto& [path, ma] : a.modules()) {
    LoraModule m;
    const double wa = a.effective_weight(path) * ma.scale();
    Tensor down = ma.down.tensor(), up = ops::mul_scalar(ma.up.tensor(), wa);
    if (b.modules().count(path)) {
      const LoraModule& mb = b.modules().at(path);
      const double wb = b.effective_weight(path) * mb.scale();
      down = ops::cat({down, mb.down.tensor()}, 0);
      up = ops::cat({up, ops::mul_scalar(mb.up.tensor(), wb)}, 1);
    }
    m.down = Variable(down.clone());
    m.up = Variable(up.clone());
    stacked[path] = m;
  }
  LoraSet twin_set(twin);
  twin_set.add_from_weights("stacked", stacked);
  EXPECT_LE(rel_diff(both, run(*twin, in.x, in.ctx)), 1e-12);
}

}  // namespace
}  // namespace loom::adapters
