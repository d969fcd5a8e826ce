// Shared down-projections (adapters/lora.h lora_forward_shared, nn::forward_shared_input): an
// attention's to_q, to_k, to_v on one input (to_k, to_v on one context) run their LoRA
// down-projections as one GEMM. Checked in f64 against the per-projection path (the same set with
// set_share_inputs(false)): the same numbers to f64 rounding — outputs ≤ 1e-14 relative (each
// element of the stacked GEMM is the same dot product, but a GEMM may round a column differently by
// where it falls in its tiles), gradients ≤ 1e-13 (the shared dx GEMM sums the three terms in
// another order, and the engine meets the graph's nodes in another order) — for one adapter, several adapters
// on different projections, weights 0, disabled adapters, LyCORIS modules, fused sets, Custom
// Diffusion; plus f64 gradchecks through the shared path (ctest -L adapters).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "adapters/custom_diffusion.h"
#include "adapters/lora.h"
#include "attention/attention.h"
#include "attention/transformer.h"
#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::adapters {
namespace {

using attention::Attention;
using attention::AttentionOptions;
using attention::Transformer2DConfig;
using attention::Transformer2DModel;

constexpr DType F64 = DType::F64;

// in_channels 6, 2 heads of dim 3 (inner 6), 2 groups, cross_attention_dim 5; two layers.
std::shared_ptr<Transformer2DModel> model_f64(uint64_t seed) {
  Transformer2DConfig c;
  c.in_channels = 6;
  c.num_attention_heads = 2;
  c.attention_head_dim = 3;
  c.norm_num_groups = 2;
  c.cross_attention_dim = 5;
  c.num_layers = 2;
  Generator gen(seed);
  return std::make_shared<Transformer2DModel>(c, gen, F64);
}

// B = 0 makes an adapter the identity change: give every up weight random values.
void randomize_up(const LoraAdapter& a, Generator& gen) {
  for (const auto& [path, m] : a.modules())
    if (m.up.defined()) m.up.tensor().copy_(Tensor::randn(m.up.shape(), gen, F64, Device::cpu(), 0.0, 0.3));
}

// The output, d(input)s and d(adapter parameter)s of one forward and backward with an upstream
// gradient drawn from `seed`, all on the CPU.
struct Pass {
  Tensor out;
  std::vector<Tensor> input_grads;
  std::map<std::string, Tensor> param_grads;
  int64_t shared_gemms = 0;
};

Pass run_pass(LoraSet& set, const std::function<Variable(const std::vector<Variable>&)>& fn,
              const std::vector<Tensor>& inputs, uint64_t seed) {
  std::vector<Variable> vars;
  for (const Tensor& t : inputs) vars.emplace_back(t.clone(), true);
  for (const auto& [name, p] : set.trainable_parameters()) p.zero_grad();
  const int64_t before = set.shared_down_gemms();
  const Variable out = fn(vars);
  Pass pass;
  pass.shared_gemms = set.shared_down_gemms() - before;
  pass.out = out.tensor().to(Device::cpu());
  Generator gen(seed);
  out.backward(Tensor::randn(out.shape(), gen, F64).to(out.device()));
  for (const Variable& v : vars) pass.input_grads.push_back(v.grad().to(Device::cpu()));
  for (const auto& [name, p] : set.trainable_parameters())  // undefined where none arrived (weight 0)
    pass.param_grads[name] = p.grad().defined() ? p.grad().to(Device::cpu()) : Tensor();
  return pass;
}

// Runs fn with the set sharing inputs and without; expects `shared` shared GEMMs per forward
// (0: the shared path must not be taken) and the same numbers.
void expect_shared_equals_separate(LoraSet& set, const std::function<Variable(const std::vector<Variable>&)>& fn,
                                   const std::vector<Tensor>& inputs, int64_t shared) {
  set.set_share_inputs(true);
  const Pass with = run_pass(set, fn, inputs, 5);
  set.set_share_inputs(false);
  const Pass without = run_pass(set, fn, inputs, 5);
  set.set_share_inputs(true);
  EXPECT_EQ(with.shared_gemms, shared);
  EXPECT_EQ(without.shared_gemms, 0);
  EXPECT_LE(testing::rel_error(with.out, without.out), 1e-14);
  ASSERT_EQ(with.input_grads.size(), without.input_grads.size());
  for (size_t i = 0; i < with.input_grads.size(); ++i)
    EXPECT_LE(testing::rel_error(with.input_grads[i], without.input_grads[i]), 1e-13) << "input " << i;
  ASSERT_EQ(with.param_grads.size(), without.param_grads.size());
  for (const auto& [name, g] : without.param_grads) {
    ASSERT_TRUE(with.param_grads.count(name)) << name;
    ASSERT_EQ(with.param_grads.at(name).defined(), g.defined()) << name;
    if (g.defined()) {
      EXPECT_LE(testing::rel_error(with.param_grads.at(name), g), 1e-13) << name;
    }
  }
}

std::vector<Tensor> model_inputs(uint64_t seed) {
  Generator gen(seed);
  return {Tensor::randn({2, 6, 3, 4}, gen, F64), Tensor::randn({2, 7, 5}, gen, F64)};
}

Variable model_forward(const Transformer2DModel& model, const std::vector<Variable>& in) {
  return model.forward(in[0], in[1]);
}

// ---- the shared path against the separate one -----------------------------------------------------------

TEST(LoraShared, OneAdapterOnQkvOfEveryAttention) {
  auto model = model_f64(11);
  LoraSet set(model);
  LoraConfig config;
  config.rank = 3, config.alpha = 5.0;
  Generator gen(12);
  randomize_up(set.add("a", config, gen), gen);
  // Per layer: attn1's q, k, v on its own input, attn2's k, v on the context: 2 GEMMs × 2 layers.
  expect_shared_equals_separate(
      set, [&](const std::vector<Variable>& in) { return model_forward(*model, in); }, model_inputs(13), 4);
}

TEST(LoraShared, SeveralAdaptersOnDifferentProjectionsWeightsAndBlockWeights) {
  auto model = model_f64(21);
  LoraSet set(model);
  Generator gen(22);
  LoraConfig a;
  a.rank = 2, a.alpha = 3.0;
  a.rank_pattern = {{"attn1.to_k", 4}};  // ranks differ within one stack
  LoraConfig b;
  b.rank = 1, b.use_rslora = true, b.alpha = 2.0, b.targets = {"attn1.to_k", "attn1.to_v", "attn2.to_k"};
  LoraConfig c;
  c.rank = 2, c.targets = {"to_q", "to_v"};
  randomize_up(set.add("a", a, gen), gen);
  randomize_up(set.add("b", b, gen), gen);
  randomize_up(set.add("c", c, gen), gen);
  set.set_weight("b", 0.5);
  set.set_block_weight("a", "transformer_blocks.1.attn1.to_q", 0.0);  // a: only k, v shared there
  set.set_block_weight("c", "transformer_blocks.0", -0.75);
  // Block 0: a on attn1 q,k,v and attn2 k,v (2); b on attn1 k,v (1); c on attn1 q,v (1).
  // Block 1: a on attn1 k,v (q weighted 0) and attn2 k,v (2); b (1); c (1).
  expect_shared_equals_separate(
      set, [&](const std::vector<Variable>& in) { return model_forward(*model, in); }, model_inputs(23), 8);
}

TEST(LoraShared, DisabledAdaptersAndWeightZeroFallBack) {
  auto model = model_f64(31);
  LoraSet set(model);
  Generator gen(32);
  LoraConfig config;
  config.rank = 2;
  randomize_up(set.add("a", config, gen), gen);
  randomize_up(set.add("b", config, gen), gen);
  set.disable("b");
  set.set_block_weight("a", "attn2", 0.0);  // attn2: no term at all
  set.set_block_weight("a", "transformer_blocks.1.attn1.to_k", 0.0);
  set.set_block_weight("a", "transformer_blocks.1.attn1.to_v", 0.0);  // block 1: q alone, not shared
  expect_shared_equals_separate(
      set, [&](const std::vector<Variable>& in) { return model_forward(*model, in); }, model_inputs(33), 1);
  set.set_weight("a", 0.0);
  expect_shared_equals_separate(
      set, [&](const std::vector<Variable>& in) { return model_forward(*model, in); }, model_inputs(34), 0);
}

TEST(LoraShared, LycorisModuleAmongPlainOnesGoesAlone) {
  auto model = model_f64(41);
  LoraSet set(model);
  Generator gen(42);
  auto param = [&](const Shape& s) { return Variable(Tensor::randn(s, gen, F64, Device::cpu(), 0.0, 0.5)); };
  std::map<std::string, LoraModule> modules;
  for (const char* p : {"transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_v"}) {
    LoraModule m;
    m.down = param({2, 6}), m.up = param({6, 2}), m.alpha = 1.0;
    modules[p] = m;
  }
  LoraModule loha;  // on to_k of the same attention: its dense change, not in the stack
  loha.kind = ModuleKind::LoHa;
  loha.alpha = 1.5;
  loha.factors = {{"hada_w1_a", param({6, 2})}, {"hada_w1_b", param({2, 6})}, {"hada_w2_a", param({6, 2})},
                  {"hada_w2_b", param({2, 6})}};
  modules["transformer_blocks.0.attn1.to_k"] = loha;
  LoraModule dora;  // a LoRA with DoRA: not plain either
  dora.down = param({2, 5}), dora.up = param({6, 2}), dora.alpha = 2.0;
  dora.magnitude = Variable(Tensor::rand({6}, gen, F64, Device::cpu(), 0.5, 1.5));
  modules["transformer_blocks.0.attn2.to_k"] = dora;
  LoraModule plain_v;
  plain_v.down = param({2, 5}), plain_v.up = param({6, 2});
  modules["transformer_blocks.0.attn2.to_v"] = plain_v;
  set.add_from_weights("ly", modules);
  // Only attn1's q and v stack: attn2's v is the one plain term of its pair.
  expect_shared_equals_separate(
      set, [&](const std::vector<Variable>& in) { return model_forward(*model, in); }, model_inputs(43), 1);
}

TEST(LoraShared, FusedSetRunsNoSharedGemm) {
  auto model = model_f64(51);
  LoraSet set(model);
  Generator gen(52);
  LoraConfig config;
  config.rank = 2;
  randomize_up(set.add("a", config, gen), gen);
  const std::vector<Tensor> in = model_inputs(53);
  NoGradGuard no_grad;
  const Tensor unfused = model->forward(Variable(in[0]), Variable(in[1])).tensor();
  set.fuse();
  const int64_t before = set.shared_down_gemms();
  const Tensor fused = model->forward(Variable(in[0]), Variable(in[1])).tensor();
  EXPECT_EQ(set.shared_down_gemms(), before);
  EXPECT_LE(testing::rel_error(fused, unfused), 1e-12);
  set.unfuse();
  EXPECT_EQ(model->forward(Variable(in[0]), Variable(in[1])).tensor().to_vector(), unfused.to_vector());
  EXPECT_GT(set.shared_down_gemms(), before);
}

TEST(LoraShared, CustomDiffusionOnAttn2WithLoraOnAttn1) {
  auto model = model_f64(61);
  LoraSet set(model);
  Generator gen(62);
  LoraConfig config;
  config.rank = 2;
  randomize_up(set.add("a", config, gen), gen);
  apply_custom_diffusion(*model, "crossattn_kv");
  // attn2 runs Custom Diffusion's processor (its own projections): only attn1's stacks remain.
  expect_shared_equals_separate(
      set, [&](const std::vector<Variable>& in) { return model_forward(*model, in); }, model_inputs(63), 2);
}

// ---- gradients through the shared path ---------------------------------------------------------------------

TEST(LoraShared, GradcheckSelfAndCrossAttention) {
  AttentionOptions o;
  o.query_dim = 5, o.heads = 2, o.dim_head = 2, o.bias = true, o.dtype = F64;  // context of query_dim channels
  Generator gen(71);
  auto attn = std::make_shared<Attention>(o, gen);
  LoraSet set(attn);
  LoraConfig a;
  a.rank = 2, a.alpha = 3.0;
  a.rank_pattern = {{"to_v", 1}};
  randomize_up(set.add("a", a, gen), gen);
  LoraConfig b;
  b.rank = 1, b.targets = {"to_q", "to_k"};
  randomize_up(set.add("b", b, gen), gen);
  std::vector<Variable> inputs{Variable(Tensor::randn({2, 3, 5}, gen, F64), true),
                               Variable(Tensor::randn({2, 4, 5}, gen, F64), true)};
  for (const auto& [name, p] : set.trainable_parameters()) inputs.push_back(p);
  for (bool cross : {false, true}) {
    SCOPED_TRACE(cross ? "cross-attention" : "self-attention");
    const int64_t before = set.shared_down_gemms();
    const GradcheckResult r = gradcheck(
        [&](const std::vector<Variable>& in) { return attn->forward(in[0], cross ? in[1] : Variable()); }, inputs);
    EXPECT_TRUE(r.ok) << r.message;
    EXPECT_GT(r.entries_checked, 0);
    EXPECT_GT(set.shared_down_gemms(), before) << "the shared path was not taken";
  }
}

// ---- CUDA ---------------------------------------------------------------------------------------------------

TEST(LoraShared, CudaSharedEqualsSeparateAndTheCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  auto cpu = model_f64(81), gpu = model_f64(81);  // same seed: same weights
  gpu->to(Device::cuda(0));
  LoraSet cpu_set(cpu), gpu_set(gpu);
  LoraConfig config;
  config.rank = 3, config.alpha = 2.0;
  Generator g1(82), g2(82);
  randomize_up(cpu_set.add("a", config, g1), g1);
  LoraAdapter& ga = gpu_set.add("a", config, g2);
  for (const auto& [path, m] : ga.modules())  // the CPU's up weights, moved over
    m.up.tensor().copy_(cpu_set.adapter("a").modules().at(path).up.tensor().to(Device::cuda(0)));
  const std::vector<Tensor> in = model_inputs(83);
  const std::vector<Tensor> in_gpu{in[0].to(Device::cuda(0)), in[1].to(Device::cuda(0))};
  auto on = [](const Transformer2DModel& m) {
    return [&m](const std::vector<Variable>& v) { return model_forward(m, v); };
  };
  expect_shared_equals_separate(gpu_set, on(*gpu), in_gpu, 4);
  const Pass g = run_pass(gpu_set, on(*gpu), in_gpu, 5), c = run_pass(cpu_set, on(*cpu), in, 5);
  EXPECT_LE(testing::rel_error(g.out, c.out), 1e-12);
  for (size_t i = 0; i < c.input_grads.size(); ++i)
    EXPECT_LE(testing::rel_error(g.input_grads[i], c.input_grads[i]), 1e-12) << "input " << i;
  for (const auto& [name, grad] : c.param_grads)
    EXPECT_LE(testing::rel_error(g.param_grads.at(name), grad), 1e-12) << name;
}

}  // namespace
}  // namespace loom::adapters
