// LoRA adapters (adapters/lora.h): f64 gradient checks through Attention, a block and a Transformer2DModel; CUDA.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "adapters/lora.h"
#include "attention/attention.h"
#include "attention/sdpa.h"
#include "attention/transformer.h"
#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "tensor/backend.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::adapters {
namespace {

using attention::Attention;
using attention::AttentionOptions;
using attention::BackendKind;
using attention::BasicTransformerBlock;
using attention::BasicTransformerBlockOptions;
using attention::ScopedAttentionBackend;
using loom::testing::lora::all_targets;
using loom::testing::lora::randomize_up;
using loom::testing::lora::rel_diff;
using loom::testing::lora::tiny_model;

constexpr DType F64 = DType::F64;

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
