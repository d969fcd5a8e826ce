// LoRA adapters (SPEC §4, adapters/lora.h): scaling conventions, bit-exact
// identities (B = 0, weight 0, disabled, removed, unfused), adapter sums,
// per-block weights, rank/alpha patterns, fuse/unfuse, errors, Conv1x1
// targets, f64 gradient checks through an Attention layer, a
// BasicTransformerBlock and a Transformer2DModel, and the same model on CUDA
// (ctest -L adapters).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "adapters/lora.h"
#include "attention/sdpa.h"
#include "attention/transformer.h"
#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "tensor/backend.h"
#include "tensor/ops.h"
#include "tensor/random.h"

namespace loom::adapters {
namespace {

using ::testing::HasSubstr;
using attention::Attention;
using attention::AttentionOptions;
using attention::BackendKind;
using attention::BasicTransformerBlock;
using attention::BasicTransformerBlockOptions;
using attention::ScopedAttentionBackend;
using attention::Transformer2DConfig;
using attention::Transformer2DModel;

constexpr DType F64 = DType::F64;
constexpr DType F32 = DType::F32;

// ---- helpers ------------------------------------------------------------------------------------

// in_channels 4, 2 heads of dim 2 (inner 4), 2 groups, cross_attention_dim 3.
Transformer2DConfig tiny_config(bool linear_projection = false, int64_t head_dim = 2) {
  Transformer2DConfig c;
  c.in_channels = 4;
  c.num_attention_heads = 2;
  c.attention_head_dim = head_dim;
  c.norm_num_groups = 2;
  c.cross_attention_dim = 3;
  c.use_linear_projection = linear_projection;
  return c;
}

std::shared_ptr<Transformer2DModel> tiny_model(uint64_t seed, DType dtype, bool linear_projection = false,
                                               int64_t head_dim = 2) {
  Generator gen(seed);
  return std::make_shared<Transformer2DModel>(tiny_config(linear_projection, head_dim), gen, dtype);
}

// A module with one Linear child "proj": the adapted projection seen on its own.
class OneLinear : public nn::Module {
 public:
  OneLinear(int64_t in, int64_t out, bool bias, Generator& gen, DType dtype) {
    proj = register_module("proj", std::make_shared<nn::Linear>(in, out, bias, gen, dtype));
  }
  std::shared_ptr<nn::Linear> proj;
};

// Every optional target as well as the defaults.
std::vector<std::string> all_targets() {
  return {"to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"};
}

// B = 0 makes the adapter an identity change (and dA = 0): give it small random values.
void randomize_up(const LoraAdapter& a, Generator& gen, double std = 0.3) {
  for (const auto& [path, m] : a.modules())
    m.up.tensor().copy_(Tensor::randn(m.up.shape(), gen, F64, Device::cpu(), 0.0, std));
}

std::vector<double> run(const Transformer2DModel& model, const Tensor& x, const Tensor& ctx) {
  NoGradGuard no_grad;
  return model.forward(Variable(x), Variable(ctx)).tensor().to_vector();
}

// max |a − b| / max |b|
double rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return den > 0.0 ? num / den : num;
}

std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}

std::map<std::string, std::vector<double>> snapshot(const nn::Module& m) {
  std::map<std::string, std::vector<double>> s;
  for (const auto& [name, p] : m.named_parameters()) s[name] = p.tensor().to_vector();
  return s;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no exception)";
}

struct Inputs {
  Tensor x, ctx;
};

Inputs random_inputs(uint64_t seed, DType dtype, int64_t batch = 2) {
  Generator gen(seed);
  Inputs in;
  in.x = Tensor::randn({batch, 4, 3, 3}, gen, dtype);
  in.ctx = Tensor::randn({batch, 3, 3}, gen, dtype);
  return in;
}

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

// ---- per-block weights and patterns ---------------------------------------------------------------------

TEST(LoraBlockWeight, Attn2ZeroLeavesAttn1Active) {
  auto model = tiny_model(31, F64);
  const Inputs in = random_inputs(32, F64);
  LoraSet set(model);
  Generator gen(33);
  LoraAdapter& a = set.add("a", LoraConfig{}, gen);
  randomize_up(a, gen);
  set.set_block_weight("a", "attn2", 0.0);
  EXPECT_EQ(a.effective_weight("transformer_blocks.0.attn2.to_q"), 0.0);
  EXPECT_EQ(a.effective_weight("transformer_blocks.0.attn1.to_q"), 1.0);
  set.set_weight("a", 0.5);
  EXPECT_EQ(a.effective_weight("transformer_blocks.0.attn1.to_q"), 0.5);
  EXPECT_EQ(a.effective_weight("transformer_blocks.0.attn2.to_q"), 0.0);

  // Projection by projection: attn2's are their base, attn1's carry 0.5·s·B·A.
  Generator xg(34);
  for (const auto& [path, m] : a.modules()) {
    const auto linear = std::dynamic_pointer_cast<nn::Linear>(model->find_module(path));
    ASSERT_NE(linear, nullptr) << path;
    const Tensor x = Tensor::randn({2, linear->in_features()}, xg, F64);
    NoGradGuard no_grad;
    const std::vector<double> y = linear->forward(Variable(x)).tensor().to_vector();
    const std::vector<double> base = linear->base_forward(Variable(x)).tensor().to_vector();
    if (path.find("attn2") != std::string::npos) {
      EXPECT_EQ(y, base) << path;
    } else {
      const std::vector<double> delta =
          ops::mul_scalar(ops::linear(ops::linear(x, m.down.tensor()), m.up.tensor()), 0.5 * m.scale()).to_vector();
      EXPECT_LE(rel_diff(minus(y, base), delta), 1e-12) << path;
    }
  }

  // The whole model: as if the adapter had attn1's modules only, at weight 0.5.
  std::map<std::string, LoraModule> attn1_only;
  for (const auto& [path, m] : a.modules()) {
    if (path.find("attn1") == std::string::npos) continue;
    LoraModule copy;
    copy.down = Variable(m.down.tensor().clone());
    copy.up = Variable(ops::mul_scalar(m.up.tensor(), 0.5 * m.scale()));
    attn1_only[path] = copy;
  }
  auto twin = tiny_model(31, F64);
  LoraSet twin_set(twin);
  twin_set.add_from_weights("attn1", attn1_only);
  EXPECT_LE(rel_diff(run(*model, in.x, in.ctx), run(*twin, in.x, in.ctx)), 1e-12);

  // Back to 1: attn2 active again, output differs.
  const std::vector<double> blocked = run(*model, in.x, in.ctx);
  set.set_block_weight("a", "attn2", 1.0);
  EXPECT_NE(run(*model, in.x, in.ctx), blocked);
}

// A block pattern names whole path components: "transformer_blocks.1" is block 1, not
// blocks 10, 11, ... (whose paths merely contain the string).
TEST(LoraBlockWeight, PatternMatchesWholePathComponents) {
  Transformer2DConfig c = tiny_config();
  c.num_layers = 11;
  Generator gen(35);
  auto model = std::make_shared<Transformer2DModel>(c, gen, F64);
  LoraSet set(model);
  LoraAdapter& a = set.add("a", LoraConfig{}, gen);
  randomize_up(a, gen);
  set.set_block_weight("a", "transformer_blocks.1", 0.0);
  EXPECT_EQ(a.effective_weight("transformer_blocks.1.attn1.to_q"), 0.0);
  EXPECT_EQ(a.effective_weight("transformer_blocks.0.attn1.to_q"), 1.0);
  EXPECT_EQ(a.effective_weight("transformer_blocks.10.attn1.to_q"), 1.0)
      << "the pattern 'transformer_blocks.1' must not select block 10";
  const auto linear = std::dynamic_pointer_cast<nn::Linear>(model->find_module("transformer_blocks.10.attn1.to_q"));
  ASSERT_NE(linear, nullptr);
  const Tensor x = Tensor::randn({2, 4}, gen, F64);
  NoGradGuard no_grad;
  EXPECT_NE(linear->forward(Variable(x)).tensor().to_vector(), linear->base_forward(Variable(x)).tensor().to_vector())
      << "block 10's adapter was switched off by the pattern for block 1";
}

TEST(LoraPatterns, RankAndAlphaPatternsPerModule) {
  auto model = tiny_model(41, F64);
  LoraSet set(model);
  LoraConfig config;
  config.rank = 2;
  config.alpha = 4.0;
  // std::map iterates "attn2.to_k" before "to_k": the longest match must win, not the last.
  config.rank_pattern = {{"to_k", 3}, {"attn2.to_k", 5}, {"to_v", 1}};
  config.alpha_pattern = {{"attn1.to_q", 1.0}, {"to_out.0", 6.0}, {"transformer_blocks.0.attn2.to_out.0", 10.0}};
  Generator gen(42);
  LoraAdapter& a = set.add("p", config, gen);
  auto rank = [&](const std::string& p) { return a.module("transformer_blocks.0." + p).rank; };
  auto scale = [&](const std::string& p) { return a.module("transformer_blocks.0." + p).scale(); };
  EXPECT_EQ(rank("attn1.to_q"), 2);
  EXPECT_EQ(rank("attn2.to_q"), 2);
  EXPECT_EQ(rank("attn1.to_k"), 3);
  EXPECT_EQ(rank("attn2.to_k"), 5);
  EXPECT_EQ(rank("attn1.to_v"), 1);
  EXPECT_EQ(rank("attn2.to_v"), 1);
  EXPECT_EQ(a.module("transformer_blocks.0.attn2.to_k").down.shape(), (Shape{5, 3}));
  EXPECT_EQ(a.module("transformer_blocks.0.attn2.to_k").up.shape(), (Shape{4, 5}));
  EXPECT_DOUBLE_EQ(scale("attn1.to_q"), 1.0 / 2.0);
  EXPECT_DOUBLE_EQ(scale("attn2.to_q"), 4.0 / 2.0);
  EXPECT_DOUBLE_EQ(scale("attn1.to_k"), 4.0 / 3.0);
  EXPECT_DOUBLE_EQ(scale("attn2.to_k"), 4.0 / 5.0);
  EXPECT_DOUBLE_EQ(scale("attn1.to_v"), 4.0 / 1.0);
  EXPECT_DOUBLE_EQ(scale("attn1.to_out.0"), 6.0 / 2.0);
  EXPECT_DOUBLE_EQ(scale("attn2.to_out.0"), 10.0 / 2.0);

  // The scale reaches the output: attn2.to_k adds (4/5)·B·A·x.
  randomize_up(a, gen);
  const LoraModule& m = a.module("transformer_blocks.0.attn2.to_k");
  const auto linear = std::dynamic_pointer_cast<nn::Linear>(model->find_module("transformer_blocks.0.attn2.to_k"));
  const Tensor x = Tensor::randn({3, 3}, gen, F64);
  NoGradGuard no_grad;
  const std::vector<double> delta = minus(linear->forward(Variable(x)).tensor().to_vector(),
                                          linear->base_forward(Variable(x)).tensor().to_vector());
  EXPECT_LE(rel_diff(delta, ops::mul_scalar(ops::linear(ops::linear(x, m.down.tensor()), m.up.tensor()), 0.8)
                                .to_vector()),
            1e-12);

  LoraConfig bad;
  bad.rank_pattern = {{"to_q", 0}};
  EXPECT_THAT(message_of([&] { set.add("bad", bad); }), HasSubstr("to_q"));
}

// ---- fuse / unfuse ----------------------------------------------------------------------------------------

// Two adapters with weights, a block weight, a disabled third one; Linear and Conv1x1 targets.
void attach_mixed(LoraSet& set, Generator& gen) {
  LoraConfig ca;
  ca.rank = 2, ca.alpha = 3.0, ca.targets = all_targets();
  LoraConfig cb;
  cb.rank = 3, cb.alpha = 2.0, cb.use_rslora = true, cb.targets = {"to_k", "to_v", "proj_out"};
  randomize_up(set.add("a", ca, gen), gen);
  randomize_up(set.add("b", cb, gen), gen);
  randomize_up(set.add("off", ca, gen), gen);
  set.set_weight("b", 0.6);
  set.set_block_weight("a", "attn1", -0.5);
  set.disable("off");
}

TEST(LoraFuse, FusedEqualsUnfused) {
  for (DType dtype : {F64, F32}) {
    for (bool linear_projection : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + (linear_projection ? " linear" : " conv"));
      auto model = tiny_model(51, dtype, linear_projection);
      const Inputs in = random_inputs(52, dtype);
      const std::vector<double> base = run(*model, in.x, in.ctx);
      LoraSet set(model);
      Generator gen(53);
      attach_mixed(set, gen);
      const std::vector<double> unfused = run(*model, in.x, in.ctx);
      ASSERT_GT(rel_diff(unfused, base), 1e-3) << "the adapters must change the output";
      const Shape proj_in_shape = model->find_parameter("proj_in.weight").shape();
      set.fuse();
      EXPECT_TRUE(set.fused());
      EXPECT_EQ(model->find_parameter("proj_in.weight").shape(), proj_in_shape);
      EXPECT_EQ(model->find_parameter("proj_in.weight").dtype(), dtype);
      const std::vector<double> fused = run(*model, in.x, in.ctx);
      EXPECT_LE(rel_diff(fused, unfused), dtype == F64 ? 1e-12 : 1e-5);
      set.unfuse();
      EXPECT_FALSE(set.fused());
      EXPECT_EQ(run(*model, in.x, in.ctx), unfused);
    }
  }
}

TEST(LoraFuse, FusedWeightIsBasePlusSumOfScaledBA) {
  auto model = tiny_model(54, F64);
  const Tensor w0 = model->find_parameter("transformer_blocks.0.attn1.to_q.weight").tensor().clone();
  LoraSet set(model);
  Generator gen(55);
  LoraConfig c;
  c.rank = 2, c.alpha = 1.0;
  LoraAdapter& a = set.add("a", c, gen);
  LoraAdapter& b = set.add("b", c, gen);
  randomize_up(a, gen);
  randomize_up(b, gen);
  set.set_weight("b", 2.0);
  const LoraModule& ma = a.module("transformer_blocks.0.attn1.to_q");
  const LoraModule& mb = b.module("transformer_blocks.0.attn1.to_q");
  const Tensor expected = ops::add(
      w0, ops::add(ops::mul_scalar(ops::matmul(ma.up.tensor(), ma.down.tensor()), 0.5),
                   ops::mul_scalar(ops::matmul(mb.up.tensor(), mb.down.tensor()), 2.0 * 0.5)));
  set.fuse();
  EXPECT_LE(rel_diff(model->find_parameter("transformer_blocks.0.attn1.to_q.weight").tensor().to_vector(),
                     expected.to_vector()),
            1e-15);
  set.unfuse();
  EXPECT_EQ(model->find_parameter("transformer_blocks.0.attn1.to_q.weight").tensor().to_vector(), w0.to_vector());
}

TEST(LoraFuse, UnfuseRestoresBaseWeightsBitForBitAfterThreeCycles) {
  for (DType dtype : {F32, F64}) {
    auto model = tiny_model(56, dtype);
    const auto before = snapshot(*model);
    const Inputs in = random_inputs(57, dtype);
    LoraSet set(model);
    Generator gen(58);
    attach_mixed(set, gen);
    const std::vector<double> unfused = run(*model, in.x, in.ctx);
    for (int cycle = 0; cycle < 3; ++cycle) {
      set.fuse();
      EXPECT_NE(snapshot(*model), before) << "fuse changed no weight";
      set.unfuse();
      EXPECT_EQ(snapshot(*model), before) << dtype << " cycle " << cycle;
    }
    EXPECT_EQ(run(*model, in.x, in.ctx), unfused);
    // Changing the adapters between cycles still unfuses to the same base.
    set.set_weight("a", 3.0);
    set.fuse();
    set.unfuse();
    EXPECT_EQ(snapshot(*model), before);
  }
}

TEST(LoraFuse, OperationsWhileFusedThrow) {
  auto model = tiny_model(59, F32);
  LoraSet set(model);
  Generator gen(60);
  randomize_up(set.add("a", LoraConfig{}, gen), gen);
  set.fuse();
  const std::vector<std::pair<std::string, std::function<void()>>> ops_while_fused = {
      {"set_weight", [&] { set.set_weight("a", 0.5); }},
      {"add", [&] { set.add("b", LoraConfig{}, gen); }},
      {"remove", [&] { set.remove("a"); }},
      {"set_block_weight", [&] { set.set_block_weight("a", "attn1", 0.0); }},
      {"disable", [&] { set.disable("a"); }},
      {"fuse", [&] { set.fuse(); }},
      {"add_from_weights",
       [&] {
         LoraModule m;
         m.down = Variable(Tensor::zeros({1, 4}));
         m.up = Variable(Tensor::zeros({4, 1}));
         set.add_from_weights("c", {{"transformer_blocks.0.attn1.to_q", m}});
       }},
  };
  for (const auto& [name, op] : ops_while_fused) {
    const std::string msg = message_of(op);
    EXPECT_THAT(msg, HasSubstr("fused")) << name;
    EXPECT_THAT(msg, HasSubstr(name)) << name;
  }
  EXPECT_EQ(set.names(), std::vector<std::string>{"a"});
  EXPECT_EQ(set.adapter("a").weight(), 1.0);
  set.unfuse();
  EXPECT_THAT(message_of([&] { set.unfuse(); }), HasSubstr("not fused"));
  set.set_weight("a", 0.5);  // fine again
  set.remove("a");
}

// ---- Conv1x1 targets ------------------------------------------------------------------------------------

TEST(LoraConv1x1, ProjInAndProjOutAsTargets) {
  // inner 6 ≠ in_channels 4, so the in and out sides of each projection are told apart.
  auto model = tiny_model(61, F64, /*linear_projection=*/false, /*head_dim=*/3);
  ASSERT_NE(std::dynamic_pointer_cast<nn::Conv1x1>(model->find_module("proj_in")), nullptr);
  const Inputs in = random_inputs(62, F64);
  const std::vector<double> base = run(*model, in.x, in.ctx);
  LoraSet set(model);
  LoraConfig config;
  config.rank = 2;
  config.alpha = 3.0;
  config.targets = {"proj_in", "proj_out"};
  Generator gen(63);
  LoraAdapter& a = set.add("conv", config, gen);
  ASSERT_EQ(a.modules().size(), 2u);
  EXPECT_EQ(a.module("proj_in").down.shape(), (Shape{2, 4}));
  EXPECT_EQ(a.module("proj_in").up.shape(), (Shape{6, 2}));
  EXPECT_EQ(a.module("proj_out").down.shape(), (Shape{2, 6}));
  EXPECT_EQ(a.module("proj_out").up.shape(), (Shape{4, 2}));
  randomize_up(a, gen);

  // proj_in(h)[b, o, i, j] = base + 1.5·Σ_c (B·A)[o, c]·h[b, c, i, j]
  const auto proj_in = std::dynamic_pointer_cast<nn::Conv1x1>(model->find_module("proj_in"));
  const Tensor h = Tensor::randn({2, 4, 3, 3}, gen, F64);
  const Tensor h_last = h.permute({0, 2, 3, 1});
  const LoraModule& m = a.module("proj_in");
  {
    NoGradGuard no_grad;
    const std::vector<double> y = proj_in->forward(Variable(h)).tensor().contiguous().to_vector();
    const std::vector<double> base_y =
        proj_in->base_forward(Variable(h_last)).tensor().permute({0, 3, 1, 2}).contiguous().to_vector();
    const std::vector<double> delta = ops::mul_scalar(ops::linear(ops::linear(h_last, m.down.tensor()), m.up.tensor()),
                                                      1.5)
                                          .permute({0, 3, 1, 2})
                                          .contiguous()
                                          .to_vector();
    EXPECT_LE(rel_diff(minus(y, base_y), delta), 1e-12);
  }

  const std::vector<double> adapted = run(*model, in.x, in.ctx);
  EXPECT_GT(rel_diff(adapted, base), 1e-3);
  set.fuse();
  EXPECT_EQ(model->find_parameter("proj_in.weight").shape(), (Shape{6, 4, 1, 1}));
  EXPECT_LE(rel_diff(run(*model, in.x, in.ctx), adapted), 1e-12);
  set.unfuse();
  set.remove("conv");
  EXPECT_EQ(run(*model, in.x, in.ctx), base);
}

// ---- f64 gradient checks -----------------------------------------------------------------------------------

// Checks every A, B and the listed inputs; also that dA is non-zero (B ≠ 0).
void expect_lora_gradcheck(const LoraSet& set, std::vector<Variable> inputs,
                           const std::function<Variable(const std::vector<Variable>&)>& fn) {
  const size_t n_inputs = inputs.size();
  for (const auto& [name, p] : set.trainable_parameters()) inputs.push_back(p);
  ASSERT_GT(inputs.size(), n_inputs);
  {
    const Variable out = fn(inputs);
    sum(out * out).backward();
    for (const auto& [name, p] : set.trainable_parameters()) {
      ASSERT_TRUE(p.grad().defined()) << name;
      double max_abs = 0.0;
      for (double g : p.grad().to_vector()) max_abs = std::max(max_abs, std::abs(g));
      EXPECT_GT(max_abs, 1e-8) << name << ": a zero gradient checks nothing";
    }
    for (const Variable& v : inputs) v.zero_grad();
  }
  const GradcheckResult r = gradcheck(fn, inputs);
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_GT(r.entries_checked, 0);
}

TEST(LoraGradcheck, AttentionLayer) {
  for (BackendKind kind : {BackendKind::Math, BackendKind::Flash}) {
    SCOPED_TRACE(attention::backend_name(kind));
    ScopedAttentionBackend backend(kind);
    AttentionOptions o;
    o.query_dim = 4, o.heads = 2, o.dim_head = 2, o.cross_attention_dim = 3, o.bias = true, o.dtype = F64;
    Generator gen(71);
    auto attn = std::make_shared<Attention>(o, gen);
    LoraSet set(attn);
    LoraConfig config;
    config.rank = 2;
    config.alpha = 3.0;
    randomize_up(set.add("a", config, gen), gen);
    EXPECT_EQ(set.adapter("a").modules().size(), 4u);
    const Variable x(Tensor::randn({1, 3, 4}, gen, F64), true);
    const Variable ctx(Tensor::randn({1, 3, 3}, gen, F64), true);
    expect_lora_gradcheck(set, {x, ctx}, [&](const std::vector<Variable>& in) { return attn->forward(in[0], in[1]); });
  }
}

TEST(LoraGradcheck, AddedKVProjections) {
  AttentionOptions o;
  o.query_dim = 4, o.heads = 2, o.dim_head = 2, o.added_kv_proj_dim = 3, o.norm_num_groups = 2, o.dtype = F64;
  Generator gen(75);
  auto attn = std::make_shared<Attention>(o, gen);
  LoraSet set(attn);
  LoraConfig config;
  config.rank = 2;
  config.targets = {"add_k_proj", "add_v_proj", "to_k"};
  randomize_up(set.add("a", config, gen), gen);
  EXPECT_EQ(set.adapter("a").modules().size(), 3u);
  const Variable x(Tensor::randn({1, 4, 3}, gen, F64), true);  // channels first, as diffusers' added-KV processor
  const Variable ctx(Tensor::randn({1, 2, 3}, gen, F64), true);
  expect_lora_gradcheck(set, {x, ctx}, [&](const std::vector<Variable>& in) { return attn->forward(in[0], in[1]); });
}

TEST(LoraGradcheck, BasicTransformerBlock) {
  BasicTransformerBlockOptions o;
  o.dim = 4, o.heads = 2, o.dim_head = 2, o.cross_attention_dim = 3, o.dtype = F64;
  Generator gen(72);
  auto block = std::make_shared<BasicTransformerBlock>(o, gen);
  LoraSet set(block);
  LoraConfig config;
  config.rank = 2;
  config.targets = {"to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"};
  randomize_up(set.add("a", config, gen), gen);
  EXPECT_EQ(set.adapter("a").modules().size(), 10u);
  const Variable x(Tensor::randn({1, 3, 4}, gen, F64), true);
  const Variable ctx(Tensor::randn({1, 3, 3}, gen, F64), true);
  expect_lora_gradcheck(set, {x, ctx}, [&](const std::vector<Variable>& in) { return block->forward(in[0], in[1]); });
}

TEST(LoraGradcheck, Transformer2DModel) {
  for (bool linear_projection : {false, true}) {
    SCOPED_TRACE(linear_projection ? "linear projections" : "1x1 conv projections");
    auto model = tiny_model(73, F64, linear_projection);
    LoraSet set(model);
    LoraConfig a;
    a.rank = 2, a.alpha = 4.0, a.targets = all_targets();
    LoraConfig b;
    b.rank = 1, b.use_rslora = true, b.alpha = 2.0, b.targets = {"attn2.to_k", "attn2.to_v"};
    Generator gen(74);
    randomize_up(set.add("a", a, gen), gen);
    randomize_up(set.add("b", b, gen), gen);
    set.set_weight("b", 0.5);
    const Variable x(Tensor::randn({1, 4, 3, 3}, gen, F64), true);
    const Variable ctx(Tensor::randn({1, 3, 3}, gen, F64), true);
    expect_lora_gradcheck(set, {x, ctx}, [&](const std::vector<Variable>& in) { return model->forward(in[0], in[1]); });
  }
}

// ---- CUDA ------------------------------------------------------------------------------------------------------

double max_rel(const Tensor& a, const Tensor& b) {
  return rel_diff(a.to(Device::cpu()).to_vector(), b.to(Device::cpu()).to_vector());
}

TEST(LoraCuda, ForwardAndBackwardMatchTheCpuInF64) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device (loom::cuda_available() is false)";
  ScopedAttentionBackend math(BackendKind::Math);
  auto cpu = tiny_model(81, F64);
  auto gpu = tiny_model(81, F64);  // same seed: same weights
  gpu->to(Device::cuda(0));
  LoraSet cpu_set(cpu), gpu_set(gpu);
  LoraConfig config;
  config.rank = 2, config.alpha = 4.0, config.targets = all_targets();
  Generator g1(82), g2(82);
  LoraAdapter& ca = cpu_set.add("a", config, g1);
  LoraAdapter& ga = gpu_set.add("a", config, g2);
  randomize_up(ca, g1);
  randomize_up(ga, g2);
  for (const auto& [path, m] : ga.modules()) {
    EXPECT_TRUE(m.down.device().is_cuda()) << path;
    EXPECT_TRUE(m.up.device().is_cuda()) << path;
    EXPECT_EQ(m.down.tensor().to(Device::cpu()).to_vector(), ca.modules().at(path).down.tensor().to_vector());
  }
  Generator gen(83);
  const Tensor x = Tensor::randn({2, 4, 3, 3}, gen, F64), ctx = Tensor::randn({2, 3, 3}, gen, F64);
  const Tensor upstream = Tensor::randn({2, 4, 3, 3}, gen, F64);
  const Variable xc(x.clone(), true), xg(x.to(Device::cuda(0)), true);
  const Variable oc = cpu->forward(xc, Variable(ctx));
  const Variable og = gpu->forward(xg, Variable(ctx.to(Device::cuda(0))));
  EXPECT_TRUE(og.device().is_cuda());
  EXPECT_LE(max_rel(og.tensor(), oc.tensor()), 1e-10);
  oc.backward(upstream);
  og.backward(upstream.to(Device::cuda(0)));
  EXPECT_LE(max_rel(xg.grad(), xc.grad()), 1e-10);
  const auto cpu_params = cpu_set.trainable_parameters(), gpu_params = gpu_set.trainable_parameters();
  ASSERT_EQ(cpu_params.size(), gpu_params.size());
  for (size_t i = 0; i < cpu_params.size(); ++i) {
    ASSERT_EQ(cpu_params[i].first, gpu_params[i].first);
    ASSERT_TRUE(gpu_params[i].second.grad().defined()) << gpu_params[i].first;
    EXPECT_LE(max_rel(gpu_params[i].second.grad(), cpu_params[i].second.grad()), 1e-10) << gpu_params[i].first;
  }
  for (const auto& [name, p] : gpu->named_parameters()) EXPECT_FALSE(p.grad().defined()) << name;
  // Fusing on the device matches too.
  gpu_set.fuse();
  cpu_set.fuse();
  NoGradGuard no_grad;
  EXPECT_LE(max_rel(gpu->forward(Variable(x.to(Device::cuda(0))), Variable(ctx.to(Device::cuda(0)))).tensor(),
                    cpu->forward(Variable(x), Variable(ctx)).tensor()),
            1e-10);
  gpu_set.unfuse();
  cpu_set.unfuse();
}

}  // namespace
}  // namespace loom::adapters
