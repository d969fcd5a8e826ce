// Custom Diffusion (SPEC §4, adapters/custom_diffusion.h): the trainable copies
// and their diffusers names, the forward unchanged bit for bit, the gradient of
// K and V at key position 0 blocked in cross-attention (and only there), f64
// gradient checks, and the diffusers recipes (ctest -L adapters).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "adapters/custom_diffusion.h"
#include "attention/sdpa.h"
#include "attention/transformer.h"
#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "nn/norm.h"
#include "tensor/random.h"

namespace loom::adapters {
namespace {

using ::testing::HasSubstr;
using attention::Attention;
using attention::AttentionOptions;
using attention::BackendKind;
using attention::DefaultProcessor;
using attention::ScopedAttentionBackend;
using attention::Transformer2DConfig;
using attention::Transformer2DModel;

constexpr DType F64 = DType::F64;
constexpr DType F32 = DType::F32;

// ---- helpers ------------------------------------------------------------------------------------

Transformer2DConfig tiny_config(int64_t num_layers = 1) {
  Transformer2DConfig c;
  c.in_channels = 4;
  c.num_attention_heads = 2;
  c.attention_head_dim = 2;
  c.norm_num_groups = 2;
  c.cross_attention_dim = 3;
  c.num_layers = num_layers;
  return c;
}

std::shared_ptr<Transformer2DModel> tiny_model(uint64_t seed, DType dtype, int64_t num_layers = 1) {
  Generator gen(seed);
  return std::make_shared<Transformer2DModel>(tiny_config(num_layers), gen, dtype);
}

// Cross-attention (query_dim 4, 2 heads of 2, context channels 3) or self-attention.
std::shared_ptr<Attention> tiny_attention(uint64_t seed, DType dtype, bool cross, bool out_bias = true) {
  AttentionOptions o;
  o.query_dim = 4, o.heads = 2, o.dim_head = 2, o.out_bias = out_bias, o.dtype = dtype;
  if (cross) o.cross_attention_dim = 3;
  Generator gen(seed);
  return std::make_shared<Attention>(o, gen);
}

CustomDiffusionOptions cd_options(bool train_kv, bool train_q_out) {
  CustomDiffusionOptions o;
  o.train_kv = train_kv;
  o.train_q_out = train_q_out;
  return o;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no exception)";
}

double rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return den > 0.0 ? num / den : num;
}

std::vector<double> values(const Variable& v) { return v.tensor().to_vector(); }

std::set<std::string> names_of(const std::vector<std::pair<std::string, Variable>>& params) {
  std::set<std::string> names;
  for (const auto& [name, v] : params) names.insert(name);
  return names;
}

// ---- block_first_position_gradient -------------------------------------------------------------

TEST(BlockFirstPositionGradient, ForwardIsIdentityAndGradientIsZeroOnlyAtPositionZero) {
  for (DType dtype : {F32, F64}) {
    SCOPED_TRACE(dtype_name(dtype));
    Generator gen(1);
    const Variable x(Tensor::randn({2, 4, 3}, gen, dtype), true);
    const Variable y = block_first_position_gradient(x);
    EXPECT_EQ(y.shape(), x.shape());
    EXPECT_EQ(y.dtype(), dtype);
    EXPECT_EQ(values(y), values(x)) << "the forward must be unchanged bit for bit";
    const Tensor upstream = Tensor::randn({2, 4, 3}, gen, dtype);
    y.backward(upstream);
    ASSERT_TRUE(x.grad().defined());
    const std::vector<double> g = x.grad().to_vector(), u = upstream.to_vector();
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t k = 0; k < 4; ++k)
        for (int64_t c = 0; c < 3; ++c) {
          const size_t i = size_t((b * 4 + k) * 3 + c);
          if (k == 0)
            EXPECT_EQ(g[i], 0.0) << "b " << b << " c " << c;
          else
            EXPECT_EQ(g[i], u[i]) << "b " << b << " k " << k << " c " << c;
        }
  }
}

TEST(BlockFirstPositionGradient, PassesGradientToEarlierOpsAndRejectsOtherRanks) {
  Generator gen(2);
  const Variable w(Tensor::randn({3}, gen, F64), true);
  const Variable x(Tensor::randn({1, 3, 3}, gen, F64));
  const Variable y = block_first_position_gradient(x * w);  // a non-leaf input
  sum(y).backward();
  // d/dw Σ_{k≥1, c} x[k, c]·w[c] = Σ_{k≥1} x[k, c]
  const std::vector<double> xv = x.tensor().to_vector(), gw = w.grad().to_vector();
  for (size_t c = 0; c < 3; ++c) EXPECT_DOUBLE_EQ(gw[c], xv[3 + c] + xv[6 + c]);
  EXPECT_THAT(message_of([&] { block_first_position_gradient(Variable(Tensor::zeros({3, 3}))); }),
              HasSubstr("[3, 3]"));
  // A single key: every gradient is blocked.
  const Variable one(Tensor::randn({2, 1, 3}, gen, F64), true);
  sum(block_first_position_gradient(one) * 2.0).backward();
  for (double v : one.grad().to_vector()) EXPECT_EQ(v, 0.0);
}

// ---- the processor ----------------------------------------------------------------------------------

TEST(CustomDiffusionProcessor, ParametersAreCopiesWithDiffusersNames) {
  auto attn = tiny_attention(3, F32, /*cross=*/true);
  const auto base = attn->state_dict();
  std::map<std::string, std::vector<double>> base_values;
  for (const auto& [k, t] : base) base_values[k] = t.clone().to_vector();
  auto processor = std::make_shared<CustomDiffusionProcessor>(*attn, cd_options(true, true));
  EXPECT_EQ(processor->type_name(), "CustomDiffusionAttnProcessor");
  attn->set_processor(processor);
  EXPECT_EQ(attn->processor(), processor);
  std::map<std::string, Shape> shapes;
  for (const auto& [name, p] : attn->named_parameters())
    if (name.rfind("processor.", 0) == 0) shapes[name] = p.shape();
  const std::map<std::string, Shape> expected = {
      {"processor.to_k_custom_diffusion.weight", {4, 3}},
      {"processor.to_v_custom_diffusion.weight", {4, 3}},
      {"processor.to_q_custom_diffusion.weight", {4, 4}},
      {"processor.to_out_custom_diffusion.0.weight", {4, 4}},
      {"processor.to_out_custom_diffusion.0.bias", {4}},
  };
  EXPECT_EQ(shapes, expected);
  const auto sd = attn->state_dict();
  auto same = [&](const std::string& custom, const std::string& original) {
    ASSERT_TRUE(sd.count(custom)) << custom;
    EXPECT_EQ(sd.at(custom).to_vector(), base_values.at(original)) << custom << " vs " << original;
    EXPECT_NE(sd.at(custom).storage(), sd.at(original).storage()) << custom << " shares memory with " << original;
  };
  same("processor.to_k_custom_diffusion.weight", "to_k.weight");
  same("processor.to_v_custom_diffusion.weight", "to_v.weight");
  same("processor.to_q_custom_diffusion.weight", "to_q.weight");
  same("processor.to_out_custom_diffusion.0.weight", "to_out.0.weight");
  same("processor.to_out_custom_diffusion.0.bias", "to_out.0.bias");
  // Writing the copy leaves the base alone.
  sd.at("processor.to_k_custom_diffusion.weight").fill_(0.25);
  EXPECT_EQ(attn->find_parameter("to_k.weight").tensor().to_vector(), base_values.at("to_k.weight"));
  for (const auto& [k, v] : base_values) EXPECT_EQ(attn->state_dict().at(k).to_vector(), v) << k;
}

TEST(CustomDiffusionProcessor, FlagsSelectTheProjections) {
  auto attn = tiny_attention(4, F32, true);
  auto kv = std::make_shared<CustomDiffusionProcessor>(*attn, cd_options(true, false));
  std::set<std::string> kv_names;
  for (const auto& [name, p] : kv->named_parameters()) kv_names.insert(name);
  EXPECT_EQ(kv_names, (std::set<std::string>{"to_k_custom_diffusion.weight", "to_v_custom_diffusion.weight"}));
  auto q_out = std::make_shared<CustomDiffusionProcessor>(*attn, cd_options(false, true));
  std::set<std::string> q_names;
  for (const auto& [name, p] : q_out->named_parameters()) q_names.insert(name);
  EXPECT_EQ(q_names, (std::set<std::string>{"to_q_custom_diffusion.weight", "to_out_custom_diffusion.0.weight",
                                            "to_out_custom_diffusion.0.bias"}));
  // out_bias on a base without one: a zero bias; out_bias off: none.
  auto no_bias = tiny_attention(4, F32, true, /*out_bias=*/false);
  auto zero_bias = std::make_shared<CustomDiffusionProcessor>(*no_bias, cd_options(true, true));
  const Variable b = zero_bias->find_parameter("to_out_custom_diffusion.0.bias");
  ASSERT_TRUE(b.defined());
  for (double v : b.tensor().to_vector()) EXPECT_EQ(v, 0.0);
  CustomDiffusionOptions o = cd_options(true, true);
  o.out_bias = false;
  auto without = std::make_shared<CustomDiffusionProcessor>(*no_bias, o);
  EXPECT_FALSE(without->find_parameter("to_out_custom_diffusion.0.bias").defined());
  // A biased to_k has no bias-free copy (diffusers' layout): refused, naming it.
  AttentionOptions biased;
  biased.query_dim = 4, biased.heads = 2, biased.dim_head = 2, biased.bias = true;
  Attention with_bias(biased);
  EXPECT_THAT(message_of([&] { std::make_shared<CustomDiffusionProcessor>(with_bias, cd_options(true, false)); }),
              HasSubstr("to_k"));
}

// Custom Diffusion's forward equals the default processor's, bit for bit (the copies
// start equal and the position-0 block does not touch the values).
TEST(CustomDiffusionProcessor, ForwardEqualsBaseBitForBit) {
  struct Flags {
    bool kv, q_out;
  };
  for (DType dtype : {F32, F64})
    for (bool cross : {true, false})
      for (bool out_bias : {true, false})
        for (Flags f : {Flags{true, false}, Flags{true, true}, Flags{false, true}}) {
          SCOPED_TRACE(std::string(dtype_name(dtype)) + (cross ? " cross" : " self") + " kv " +
                       std::to_string(f.kv) + " q_out " + std::to_string(f.q_out) + " out_bias " +
                       std::to_string(out_bias));
          auto attn = tiny_attention(5, dtype, cross, out_bias);
          Generator gen(6);
          const Variable x(Tensor::randn({2, 3, 4}, gen, dtype));
          const Variable x4(Tensor::randn({2, 4, 2, 2}, gen, dtype));  // 4-D input
          const Variable ctx = cross ? Variable(Tensor::randn({2, 5, 3}, gen, dtype)) : Variable();
          const Tensor mask = Tensor::randn({2, 1, cross ? 5 : 3}, gen, dtype);
          NoGradGuard no_grad;
          const std::vector<double> base = values(attn->forward(x, ctx));
          const std::vector<double> base_masked = values(attn->forward(x, ctx, mask));
          const std::vector<double> base4 = cross ? values(attn->forward(x4, ctx)) : std::vector<double>{};
          attn->set_processor(std::make_shared<CustomDiffusionProcessor>(*attn, cd_options(f.kv, f.q_out)));
          EXPECT_EQ(values(attn->forward(x, ctx)), base);
          EXPECT_EQ(values(attn->forward(x, ctx, mask)), base_masked);
          if (cross) {
            EXPECT_EQ(values(attn->forward(x4, ctx)), base4);
          }
        }
}

// ---- gradient blocking ----------------------------------------------------------------------------------

// The Custom Diffusion cross-attention forward written out with K and V at position 0
// detached (and the default processor's building blocks).
Variable reference_forward(const Attention& attn, const CustomDiffusionProcessor& p, const Variable& x,
                           const Variable& ctx) {
  auto lin = [&](const char* name) { return p.child_as<nn::Linear>(name); };
  const Variable seq = attn.to_sequence(x);
  const Variable q = lin("to_q_custom_diffusion")->forward(seq);
  Variable k = lin("to_k_custom_diffusion")->forward(ctx);
  Variable v = lin("to_v_custom_diffusion")->forward(ctx);
  const int64_t keys = ctx.size(1);
  k = cat({slice(k, 1, 0, 1).detach(), slice(k, 1, 1, keys)}, 1);
  v = cat({slice(v, 1, 0, 1).detach(), slice(v, 1, 1, keys)}, 1);
  const Variable o =
      attn.batch_to_head(attn.attend(attn.head_to_batch(q), attn.head_to_batch(k), attn.head_to_batch(v), Tensor()));
  const Variable out = p.child_as<nn::ModuleList>("to_out_custom_diffusion")->at_as<nn::Linear>(0)->forward(o);
  return Attention::from_sequence(out, x.shape());
}

TEST(CustomDiffusionGradient, KeyPositionZeroIsBlockedInCrossAttention) {
  ScopedAttentionBackend math(BackendKind::Math);
  auto attn = tiny_attention(7, F64, /*cross=*/true);
  attn->set_requires_grad(true);
  Generator gen(8);
  const Tensor x = Tensor::randn({2, 3, 4}, gen, F64), ctx = Tensor::randn({2, 4, 3}, gen, F64);
  const Tensor upstream = Tensor::randn({2, 3, 4}, gen, F64);

  // Unblocked: the default processor, gradients on the base to_k / to_v and the context.
  const Variable ctx_default(ctx.clone(), true);
  attn->forward(Variable(x), ctx_default).backward(upstream);
  const std::vector<double> dk_unblocked = attn->find_parameter("to_k.weight").grad().to_vector();
  const std::vector<double> dctx_unblocked = ctx_default.grad().to_vector();
  attn->zero_grad();

  auto processor = std::make_shared<CustomDiffusionProcessor>(*attn, cd_options(true, true));
  attn->set_processor(processor);
  const Variable ctx_cd(ctx.clone(), true);
  attn->forward(Variable(x), ctx_cd).backward(upstream);
  const Variable wk = processor->find_parameter("to_k_custom_diffusion.weight");
  const Variable wv = processor->find_parameter("to_v_custom_diffusion.weight");
  const std::vector<double> dk = wk.grad().to_vector(), dv = wv.grad().to_vector();
  const std::vector<double> dctx = ctx_cd.grad().to_vector();
  const std::vector<double> dq = processor->find_parameter("to_q_custom_diffusion.weight").grad().to_vector();

  // The context row 0 reaches the output only through K and V at position 0: its gradient is exactly 0.
  for (int64_t b = 0; b < 2; ++b) {
    for (int64_t c = 0; c < 3; ++c) {
      EXPECT_EQ(dctx[size_t(b * 12 + c)], 0.0) << "batch " << b << " channel " << c;
      EXPECT_NE(dctx_unblocked[size_t(b * 12 + c)], 0.0);
    }
    double rest = 0.0;
    for (int64_t i = 3; i < 12; ++i) rest = std::max(rest, std::abs(dctx[size_t(b * 12 + i)]));
    EXPECT_GT(rest, 1e-6) << "rows 1.. keep their gradient";
  }
  // Rows 1.. of the context get the same gradient as without the block (same K/V paths).
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t i = 3; i < 12; ++i)
      EXPECT_NEAR(dctx[size_t(b * 12 + i)], dctx_unblocked[size_t(b * 12 + i)], 1e-12);

  // The weight gradients equal those of the written-out reference with position 0 detached ...
  processor->zero_grad();
  reference_forward(*attn, *processor, Variable(x), Variable(ctx)).backward(upstream);
  EXPECT_LE(rel_diff(dk, wk.grad().to_vector()), 1e-12);
  EXPECT_LE(rel_diff(dv, wv.grad().to_vector()), 1e-12);
  EXPECT_LE(rel_diff(dq, processor->find_parameter("to_q_custom_diffusion.weight").grad().to_vector()), 1e-12);
  // ... and differ from the unblocked ones.
  EXPECT_GT(rel_diff(dk, dk_unblocked), 1e-3);
  // The base projections (unused by the processor) get nothing.
  EXPECT_FALSE(attn->find_parameter("to_k.weight").grad().defined());
  EXPECT_FALSE(attn->find_parameter("to_q.weight").grad().defined());
}

TEST(CustomDiffusionGradient, SelfAttentionIsNotBlocked) {
  ScopedAttentionBackend math(BackendKind::Math);
  auto attn = tiny_attention(9, F64, /*cross=*/false);
  attn->set_requires_grad(true);
  Generator gen(10);
  const Tensor x = Tensor::randn({2, 3, 4}, gen, F64), upstream = Tensor::randn({2, 3, 4}, gen, F64);
  const Variable x_default(x.clone(), true);
  attn->forward(x_default).backward(upstream);
  const std::vector<double> dk_default = attn->find_parameter("to_k.weight").grad().to_vector();
  const std::vector<double> dv_default = attn->find_parameter("to_v.weight").grad().to_vector();
  auto processor = std::make_shared<CustomDiffusionProcessor>(*attn, cd_options(true, true));
  attn->set_processor(processor);
  const Variable x_cd(x.clone(), true);
  attn->forward(x_cd).backward(upstream);
  EXPECT_LE(rel_diff(processor->find_parameter("to_k_custom_diffusion.weight").grad().to_vector(), dk_default),
            1e-12);
  EXPECT_LE(rel_diff(processor->find_parameter("to_v_custom_diffusion.weight").grad().to_vector(), dv_default),
            1e-12);
  EXPECT_LE(rel_diff(x_cd.grad().to_vector(), x_default.grad().to_vector()), 1e-12);
}

// ---- f64 gradient checks ------------------------------------------------------------------------------------

void expect_gradcheck(const std::vector<Variable>& inputs, const GradcheckFn& fn) {
  const GradcheckResult r = gradcheck(fn, inputs);
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_GT(r.entries_checked, 0);
}

TEST(CustomDiffusionGradcheck, CrossAttentionLayer) {
  for (BackendKind kind : {BackendKind::Math, BackendKind::Flash}) {
    SCOPED_TRACE(attention::backend_name(kind));
    ScopedAttentionBackend backend(kind);
    auto attn = tiny_attention(11, F64, true);
    auto processor = std::make_shared<CustomDiffusionProcessor>(*attn, cd_options(true, true));
    attn->set_processor(processor);
    Generator gen(12);
    const Variable x(Tensor::randn({1, 3, 4}, gen, F64), true);
    Tensor ctx = Tensor::randn({1, 3, 3}, gen, F64);
    const auto param = [&](const char* n) { return processor->find_parameter(n); };
    auto fn = [&](const std::vector<Variable>& in) { return attn->forward(in[0], Variable(ctx)); };
    // q / out (and x) do not feed K or V: a plain check.
    expect_gradcheck({x, param("to_q_custom_diffusion.weight"), param("to_out_custom_diffusion.0.weight"),
                      param("to_out_custom_diffusion.0.bias")},
                     fn);
    // K and V: with context row 0 zero, K and V at position 0 are 0 whatever the weights (no bias),
    // so the blocked gradient is the whole gradient.
    ctx.narrow(1, 0, 1).fill_(0.0);
    expect_gradcheck({x, param("to_k_custom_diffusion.weight"), param("to_v_custom_diffusion.weight"),
                      param("to_q_custom_diffusion.weight")},
                     fn);
  }
}

TEST(CustomDiffusionGradcheck, SelfAttentionLayerEveryParameter) {
  auto attn = tiny_attention(13, F64, false);
  auto processor = std::make_shared<CustomDiffusionProcessor>(*attn, cd_options(true, true));
  attn->set_processor(processor);
  Generator gen(14);
  std::vector<Variable> inputs{Variable(Tensor::randn({1, 3, 4}, gen, F64), true)};
  for (const auto& [name, p] : processor->named_parameters()) inputs.push_back(p);
  EXPECT_EQ(inputs.size(), 6u);
  expect_gradcheck(inputs, [&](const std::vector<Variable>& in) { return attn->forward(in[0]); });
}

TEST(CustomDiffusionGradcheck, Transformer2DModelCrossattnRecipe) {
  auto model = tiny_model(15, F64);
  const auto trainable = apply_custom_diffusion(*model, "crossattn");
  Generator gen(16);
  std::vector<Variable> inputs{Variable(Tensor::randn({1, 4, 3, 3}, gen, F64), true)};
  for (const auto& [name, p] : trainable) inputs.push_back(p);
  Tensor ctx = Tensor::randn({1, 3, 3}, gen, F64);
  ctx.narrow(1, 0, 1).fill_(0.0);  // see CrossAttentionLayer
  expect_gradcheck(inputs, [&](const std::vector<Variable>& in) { return model->forward(in[0], Variable(ctx)); });
}

// ---- recipes ----------------------------------------------------------------------------------------------------

TEST(ApplyCustomDiffusion, CrossattnKvTrainsAttn2KeysAndValuesOnly) {
  auto model = tiny_model(17, F32, /*num_layers=*/2);
  Generator gen(18);
  const Variable x(Tensor::randn({2, 4, 3, 3}, gen, F32)), ctx(Tensor::randn({2, 5, 3}, gen, F32));
  std::vector<double> base;
  {
    NoGradGuard no_grad;
    base = values(model->forward(x, ctx));
  }
  const auto trainable = apply_custom_diffusion(*model);  // default recipe: crossattn_kv
  EXPECT_EQ(names_of(trainable), (std::set<std::string>{
                                     "transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight",
                                     "transformer_blocks.0.attn2.processor.to_v_custom_diffusion.weight",
                                     "transformer_blocks.1.attn2.processor.to_k_custom_diffusion.weight",
                                     "transformer_blocks.1.attn2.processor.to_v_custom_diffusion.weight",
                                 }));
  for (const auto& [name, p] : trainable) {
    EXPECT_TRUE(p.requires_grad()) << name;
    EXPECT_EQ(model->find_parameter(name).impl(), p.impl()) << name << " is not the model's parameter";
  }
  for (const auto& [name, p] : model->named_parameters())
    if (name.find(".processor.") == std::string::npos) {
      EXPECT_FALSE(p.requires_grad()) << name;
    }
  for (const auto& [name, layer] : model->attention_layers()) {
    const bool attn2 = name.find("attn2") != std::string::npos;
    EXPECT_EQ(layer->processor()->type_name(), attn2 ? "CustomDiffusionAttnProcessor" : "AttnProcessor") << name;
  }
  const auto sd = model->state_dict();
  EXPECT_TRUE(sd.count("transformer_blocks.1.attn2.processor.to_v_custom_diffusion.weight"));
  EXPECT_FALSE(sd.count("transformer_blocks.0.attn1.processor.to_k_custom_diffusion.weight"));
  NoGradGuard no_grad;
  EXPECT_EQ(values(model->forward(x, ctx)), base);
}

TEST(ApplyCustomDiffusion, CrossattnAlsoTrainsQueryAndOutput) {
  auto model = tiny_model(19, F32);
  Generator gen(20);
  const Variable x(Tensor::randn({2, 4, 3, 3}, gen, F32)), ctx(Tensor::randn({2, 5, 3}, gen, F32));
  const Tensor keep = Tensor::from_values({1, 1, 0, 1, 1, 1, 1, 1, 0, 0}, {2, 5}, F32);
  std::vector<double> base, base_masked;
  {
    NoGradGuard no_grad;
    base = values(model->forward(x, ctx));
    base_masked = values(model->forward(x, ctx, keep));
  }
  const auto trainable = apply_custom_diffusion(*model, "crossattn", /*out_bias=*/true, /*dropout=*/0.1);
  const std::string p = "transformer_blocks.0.attn2.processor.";
  EXPECT_EQ(names_of(trainable), (std::set<std::string>{
                                     p + "to_k_custom_diffusion.weight", p + "to_v_custom_diffusion.weight",
                                     p + "to_q_custom_diffusion.weight", p + "to_out_custom_diffusion.0.weight",
                                     p + "to_out_custom_diffusion.0.bias"}));
  model->eval();  // dropout off
  NoGradGuard no_grad;
  EXPECT_EQ(values(model->forward(x, ctx)), base);
  EXPECT_EQ(values(model->forward(x, ctx, keep)), base_masked);
}

TEST(ApplyCustomDiffusion, Errors) {
  auto model = tiny_model(21, F32);
  EXPECT_THAT(message_of([&] { apply_custom_diffusion(*model, "crossattn_q"); }), HasSubstr("crossattn_q"));
  Transformer2DConfig c = tiny_config();
  c.cross_attention_dim.reset();  // no attn2
  auto self_only = std::make_shared<Transformer2DModel>(c);
  EXPECT_THAT(message_of([&] { apply_custom_diffusion(*self_only); }), HasSubstr("attn2"));
}

}  // namespace
}  // namespace loom::adapters
