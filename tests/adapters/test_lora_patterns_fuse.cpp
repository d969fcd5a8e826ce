// LoRA adapters (adapters/lora.h): per-block weights, rank / alpha patterns, fuse / unfuse, Conv1x1 targets.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
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
using attention::Transformer2DConfig;
using attention::Transformer2DModel;
using loom::testing::lora::all_targets;
using loom::testing::lora::Inputs;
using loom::testing::lora::message_of;
using loom::testing::lora::minus;
using loom::testing::lora::random_inputs;
using loom::testing::lora::randomize_up;
using loom::testing::lora::rel_diff;
using loom::testing::lora::run;
using loom::testing::lora::tiny_config;
using loom::testing::lora::tiny_model;

constexpr DType F64 = DType::F64;
constexpr DType F32 = DType::F32;

std::map<std::string, std::vector<double>> snapshot(const nn::Module& m) {
  std::map<std::string, std::vector<double>> s;
  for (const auto& [name, p] : m.named_parameters()) s[name] = p.tensor().to_vector();
  return s;
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

}  // namespace
}  // namespace loom::adapters
