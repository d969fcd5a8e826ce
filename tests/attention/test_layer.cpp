// The Attention layer (SPEC §1) against diffusers itself: golden outputs of
// diffusers' Attention with the classic processors (tests/fixtures/attention/
// attn_*.json, made by tests/fixtures/make_attention_fixtures.py) in f64 and f32
// with every CPU backend; f64 gradient checks with respect to the inputs and
// parameters; masks, dropout, 4-D inputs, per-layer backends and slicing
// (ctest -L attention).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "attention/attention.h"
#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "nn/norm.h"
#include "tensor/random.h"
#include "tests/fixtures/attention_fixture.h"

namespace loom::attention {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace loom::attention::testing;

constexpr DType F64 = DType::F64;
constexpr DType F32 = DType::F32;

// ---- golden numbers from diffusers -------------------------------------------------------------

// The layer of a fixture, built from its kwargs, in f64 with diffusers' weights (strict load).
std::shared_ptr<Attention> attention_from_fixture(const Fixture& f) {
  Generator gen(1);
  auto attn = std::make_shared<Attention>(attention_options(f.config()), gen);
  attn->to(F64);
  attn->load_state_dict(state_dict(f, F64), /*strict=*/true);
  return attn;
}

Tensor run_fixture(const Attention& attn, const Fixture& f, DType dtype) {
  NoGradGuard no_grad;
  const Tensor context = input(f, "context", dtype);
  return attn.forward(Variable(input(f, "x", dtype)), context.defined() ? Variable(context) : Variable(),
                      input(f, "mask", dtype))
      .tensor();
}

TEST(AttentionFixtures, AllCasesArePresent) {
  EXPECT_THAT(fixture_names("attention"),
              ElementsAre("attn_added_kv_4d", "attn_added_kv_groupnorm_context_4d", "attn_added_kv_only_cross_4d",
                          "attn_cross_groupnorm_context", "attn_cross_masked", "attn_groupnorm_cross_layernorm_4d",
                          "attn_groupnorm_residual_4d", "attn_self", "attn_self_bqk_bias_noscale"));
}

class AttentionGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(AttentionGolden, KeysAreDiffusersKeys) {
  const Fixture f = load_fixture(GetParam());
  Generator gen(1);
  const Attention attn(attention_options(f.config()), gen);
  EXPECT_EQ(parameter_names(attn), state_dict_keys(f));
  const std::map<std::string, Tensor> sd = attn.state_dict();
  std::vector<std::string> keys;
  for (const auto& [k, v] : sd) keys.push_back(k);
  EXPECT_EQ(keys, state_dict_keys(f)) << "state_dict() has keys (buffers?) diffusers does not";
}

TEST_P(AttentionGolden, ProcessorIsTheOneDiffusersUsed) {
  const Fixture f = load_fixture(GetParam());
  const auto attn = attention_from_fixture(f);
  EXPECT_EQ(attn->processor()->type_name(), f.doc.at("processor").get<std::string>());
}

TEST_P(AttentionGolden, F64EveryBackend) {
  const Fixture f = load_fixture(GetParam());
  const auto attn = attention_from_fixture(f);
  const Tensor ref = output(f);
  for (BackendKind kind : kCpuBackends) {
    ScopedAttentionBackend guard(kind);
    const Tensor out = run_fixture(*attn, f, F64);
    EXPECT_EQ(out.shape(), ref.shape()) << backend_name(kind);
    EXPECT_EQ(out.dtype(), F64);
    EXPECT_LE(rel_error(out, ref), 1e-10) << GetParam() << " backend " << backend_name(kind);
  }
}

TEST_P(AttentionGolden, F32EveryBackend) {
  const Fixture f = load_fixture(GetParam());
  const auto attn = attention_from_fixture(f);
  attn->to(F32);
  const Tensor ref = output(f);
  const Tensor mask = input(f, "mask");
  const std::vector<bool> dropped = fully_masked_items(mask, /*keep_mask=*/false, ref.size(0));
  for (BackendKind kind : kCpuBackends) {
    ScopedAttentionBackend guard(kind);
    const Tensor out = run_fixture(*attn, f, F32);
    ASSERT_EQ(out.dtype(), F32);
    ASSERT_EQ(out.shape(), ref.shape());
    for (int64_t b = 0; b < ref.size(0); ++b)
      EXPECT_LE(rel_error_of_item(out, ref, b), dropped[size_t(b)] ? 1e-3 : 1e-5)
          << GetParam() << " backend " << backend_name(kind) << " batch item " << b
          << (dropped[size_t(b)] ? " (every key masked)" : "");
  }
}

// The per-layer override and attention slicing give the golden numbers too.
TEST_P(AttentionGolden, PerLayerBackendAndSlicing) {
  const Fixture f = load_fixture(GetParam());
  const auto attn = attention_from_fixture(f);
  const Tensor ref = output(f);
  for (BackendKind kind : kCpuBackends) {
    attn->set_backend(kind);
    EXPECT_EQ(attn->backend(), kind);
    EXPECT_LE(rel_error(run_fixture(*attn, f, F64), ref), 1e-10) << "set_backend(" << backend_name(kind) << ")";
  }
  attn->set_backend(std::nullopt);
  const int64_t rows = ref.size(0) * attn->options().heads;  // batch·heads
  for (int64_t slice : {int64_t(1), int64_t(3), rows - 1, rows, rows + 5}) {
    attn->set_attention_slice(slice);
    EXPECT_EQ(attn->attention_slice(), slice);
    EXPECT_LE(rel_error(run_fixture(*attn, f, F64), ref), 1e-10) << "set_attention_slice(" << slice << ")";
  }
  attn->set_attention_slice(0);
  EXPECT_LE(rel_error(run_fixture(*attn, f, F64), ref), 1e-10) << "slicing off again";
}

INSTANTIATE_TEST_SUITE_P(Diffusers, AttentionGolden, ::testing::ValuesIn(fixture_names("attention")),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

// ---- f64 gradient checks -----------------------------------------------------------------------

// Fresh N(0, 0.5²) values for every parameter (1 + that for norm weights), so that no
// gradient hides behind a 0 bias or a unit norm weight.
void randomize(nn::Module& m, Generator& gen) {
  for (const auto& [name, p] : m.named_parameters()) {
    const bool norm_weight = name.find("norm") != std::string::npos && name.size() > 7 &&
                             name.compare(name.size() - 7, 7, ".weight") == 0;
    p.tensor().copy_(Tensor::randn(p.shape(), gen, p.dtype(), Device::cpu(), norm_weight ? 1.0 : 0.0, 0.5));
  }
}

struct GradCase {
  std::string what;
  AttentionOptions options;
  Shape x_shape;
  Shape context_shape;  // empty: self-attention
  Tensor mask;          // additive bias, or undefined
  std::vector<std::string> params;
};

void expect_attention_gradcheck(const GradCase& c, BackendKind kind, uint64_t seed) {
  Generator gen(seed);
  Attention attn(c.options, gen);
  attn.to(F64);
  randomize(attn, gen);
  std::vector<Variable> inputs{Variable(Tensor::randn(c.x_shape, gen, F64), true)};
  const bool cross = !c.context_shape.empty();
  if (cross) inputs.emplace_back(Tensor::randn(c.context_shape, gen, F64), true);
  const size_t first_param = inputs.size();
  for (const std::string& name : c.params) {
    const Variable p = attn.find_parameter(name);
    ASSERT_TRUE(p.defined()) << c.what << ": no parameter " << name;
    ASSERT_EQ(p.dtype(), F64);
    ASSERT_TRUE(p.is_leaf() && p.requires_grad()) << name;
    inputs.push_back(p);
  }
  ASSERT_EQ(inputs.size(), first_param + c.params.size());
  ScopedAttentionBackend guard(kind);
  const GradcheckResult r = gradcheck(
      [&](const std::vector<Variable>& in) { return attn.forward(in[0], cross ? in[1] : Variable(), c.mask); },
      inputs);
  EXPECT_TRUE(r.ok) << c.what << " (" << backend_name(kind) << "): " << r.message;
  EXPECT_GT(r.entries_checked, 0);
}

std::vector<GradCase> grad_cases() {
  std::vector<GradCase> cases;
  AttentionOptions self;
  self.query_dim = 4, self.heads = 2, self.dim_head = 2, self.bias = true;
  cases.push_back({"self", self, {2, 3, 4}, {}, Tensor(), {"to_q.weight", "to_k.weight", "to_v.bias", "to_out.0.bias"}});

  AttentionOptions cross = self;
  cross.cross_attention_dim = 3, cross.bias = false;
  cases.push_back({"cross", cross, {1, 3, 4}, {1, 2, 3}, Tensor(),
                   {"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"}});

  // (B, 1, K) bias with dropped keys; batch 1 has every key dropped.
  const Tensor bias = Tensor::from_values({0, -10000, 0, -10000, -10000, -10000}, {2, 1, 3}, F64);
  AttentionOptions masked = cross;
  masked.bias = true;
  cases.push_back({"cross, masked", masked, {2, 2, 4}, {2, 3, 3}, bias, {"to_k.weight", "to_q.bias", "to_out.0.bias"}});

  // (B, Q, K) bias of arbitrary values, self-attention, no scale.
  Generator gen(7);
  AttentionOptions noscale = self;
  noscale.scale_qk = false;
  cases.push_back({"self, (B,Q,K) bias, scale_qk false", noscale, {1, 3, 4}, {},
                   Tensor::randn({1, 3, 3}, gen, F64, Device::cpu(), 0.0, 2.0), {"to_q.weight", "to_k.bias"}});

  // group norm, 4-D input, residual, rescale, layer_norm on the context.
  AttentionOptions normed = self;
  normed.norm_num_groups = 2, normed.residual_connection = true, normed.rescale_output_factor = 2.0;
  normed.cross_attention_dim = 3, normed.cross_attention_norm = "layer_norm";
  cases.push_back({"group_norm + norm_cross + residual, 4-D", normed, {1, 4, 2, 2}, {1, 2, 3}, Tensor(),
                   {"group_norm.weight", "group_norm.bias", "norm_cross.weight", "to_k.weight"}});

  // added-KV, 4-D, with a mask over context + self keys (2 + 4).
  AttentionOptions added = self;
  added.added_kv_proj_dim = 3, added.norm_num_groups = 2;
  cases.push_back({"added-KV, 4-D, masked", added, {1, 4, 2, 2}, {1, 2, 3},
                   Tensor::from_values({0, -10000, 0, 0, -10000, 0}, {1, 1, 6}, F64),
                   {"add_k_proj.weight", "add_v_proj.bias", "to_k.weight", "to_v.weight", "group_norm.weight"}});

  AttentionOptions only_cross = added;
  only_cross.only_cross_attention = true;
  cases.push_back({"added-KV only_cross_attention, 4-D", only_cross, {1, 4, 1, 3}, {1, 2, 3}, Tensor(),
                   {"add_k_proj.weight", "add_v_proj.weight", "to_q.weight"}});
  return cases;
}

class AttentionGradcheck : public ::testing::TestWithParam<BackendKind> {};

TEST_P(AttentionGradcheck, InputsContextAndParameters) {
  uint64_t seed = 100;
  for (const GradCase& c : grad_cases()) expect_attention_gradcheck(c, GetParam(), seed++);
}

INSTANTIATE_TEST_SUITE_P(Backends, AttentionGradcheck,
                         ::testing::Values(BackendKind::Math, BackendKind::Flash, BackendKind::Sliced),
                         [](const ::testing::TestParamInfo<BackendKind>& i) { return backend_name(i.param); });

TEST(AttentionGradcheck, SlicedLayerWithRemainder) {
  // Slices of 3 rows of batch·heads: 2·2 = 4 rows leave a remainder of 1; 1·2 = 2 rows fit in one slice.
  for (const GradCase& c : grad_cases()) {
    Generator gen(55);
    Attention attn(c.options, gen);
    attn.to(F64);
    randomize(attn, gen);
    attn.set_attention_slice(3);
    Variable x(Tensor::randn(c.x_shape, gen, F64), true);
    std::vector<Variable> inputs{x};
    const bool cross = !c.context_shape.empty();
    if (cross) inputs.emplace_back(Tensor::randn(c.context_shape, gen, F64), true);
    inputs.push_back(attn.find_parameter(c.params.front()));
    const GradcheckResult r = gradcheck(
        [&](const std::vector<Variable>& in) { return attn.forward(in[0], cross ? in[1] : Variable(), c.mask); },
        inputs);
    EXPECT_TRUE(r.ok) << c.what << ": " << r.message;
  }
}

// ---- behaviour ------------------------------------------------------------------------------------

AttentionOptions small_options() {
  AttentionOptions o;
  o.query_dim = 8, o.heads = 2, o.dim_head = 4, o.bias = true, o.dtype = F64;
  return o;
}

TEST(AttentionLayer, SpecDefaults) {
  const AttentionOptions o;
  EXPECT_EQ(o.heads, 8);
  EXPECT_EQ(o.dim_head, 64);
  EXPECT_EQ(o.dropout, 0.0);
  EXPECT_FALSE(o.bias);
  EXPECT_TRUE(o.out_bias);
  EXPECT_TRUE(o.scale_qk);
  EXPECT_FALSE(o.only_cross_attention);
  EXPECT_FALSE(o.residual_connection);
  EXPECT_EQ(o.rescale_output_factor, 1.0);
  EXPECT_EQ(o.eps, 1e-5);
  AttentionOptions q;
  q.query_dim = 32, q.heads = 4, q.dim_head = 16;
  const Attention attn(q);
  EXPECT_EQ(attn.cross_attention_dim(), 32);  // defaults to query_dim
  EXPECT_EQ(attn.inner_dim(), 64);
  EXPECT_DOUBLE_EQ(attn.scale(), 0.25);
  EXPECT_THAT(parameter_names(attn),
              ElementsAre("to_k.weight", "to_out.0.bias", "to_out.0.weight", "to_q.weight", "to_v.weight"));
  q.scale_qk = false;
  EXPECT_EQ(Attention(q).scale(), 1.0);
}

TEST(AttentionLayer, DropoutDefaultsToZero) {
  const Attention attn(small_options());
  const auto dropout = std::dynamic_pointer_cast<nn::Dropout>(attn.find_module("to_out.1"));
  ASSERT_NE(dropout, nullptr) << "to_out.1 must be the Dropout";
  EXPECT_EQ(dropout->p(), 0.0);
  EXPECT_TRUE(attn.is_training());  // a fresh module trains, yet dropout 0 changes nothing
  Generator gen(3);
  const Variable x(Tensor::randn({2, 5, 8}, gen, F64));
  EXPECT_EQ(attn.forward(x).tensor().to_vector(), attn.forward(x).tensor().to_vector());
}

TEST(AttentionLayer, EvalMakesDropoutInert) {
  AttentionOptions o = small_options();
  Generator gen(4);
  Attention plain(o, gen);
  o.dropout = 0.5;
  Attention dropping(o, gen);
  dropping.load_state_dict(plain.state_dict());
  const Variable x(Tensor::randn({2, 5, 8}, gen, F64));
  const Tensor ref = plain.forward(x).tensor();
  EXPECT_GT(rel_error(dropping.forward(x).tensor(), ref), 1e-3) << "dropout 0.5 while training changed nothing";
  dropping.eval();
  EXPECT_FALSE(dropping.find_module("to_out.1")->is_training());
  EXPECT_EQ(dropping.forward(x).tensor().to_vector(), ref.to_vector());
  dropping.train();
  EXPECT_GT(rel_error(dropping.forward(x).tensor(), ref), 1e-3);
}

// The context cache: while on and under no-grad, a second call with the same context tensor reuses
// the keys and values (a change of to_k's weight meanwhile goes unseen: that is how the test sees
// the reuse); another context tensor, recording gradients, or turning the cache off projects anew.
TEST(AttentionLayer, ContextCacheReusesKeysAndValuesOfTheSameContext) {
  AttentionOptions o = small_options();
  o.cross_attention_dim = 6;
  Generator gen(7);
  Attention attn(o, gen);
  randomize(attn, gen);
  const Variable x(Tensor::randn({2, 5, 8}, gen, F64)), ctx(Tensor::randn({2, 3, 6}, gen, F64));
  NoGradGuard no_grad;
  const Tensor before = attn.forward(x, ctx).tensor();
  attn.set_context_cache(true);
  EXPECT_TRUE(attn.context_cache());
  EXPECT_EQ(attn.forward(x, ctx).tensor().to_vector(), before.to_vector());  // projected, then kept
  const Tensor w = attn.projection("to_k")->weight().tensor();
  w.copy_(ops::mul_scalar(w, 2.0));
  EXPECT_EQ(attn.forward(x, ctx).tensor().to_vector(), before.to_vector()) << "the cached keys were not reused";
  const Variable same_values(ctx.tensor().clone());  // another tensor: projected anew
  const Tensor fresh = attn.forward(x, same_values).tensor();
  EXPECT_GT(rel_error(fresh, before), 1e-6) << "a different context tensor hit the cache";
  {
    GradMode::set_enabled(true);
    EXPECT_LE(rel_error(attn.forward(x, same_values).tensor(), fresh), 0.0) << "with gradients";
    GradMode::set_enabled(false);
  }
  attn.set_context_cache(false);
  EXPECT_LE(rel_error(attn.forward(x, ctx).tensor(), fresh), 0.0) << "after turning the cache off";
}

TEST(AttentionLayer, FourDInputRoundTripsAndEqualsTheSequenceForm) {
  AttentionOptions o = small_options();
  o.norm_num_groups = 2, o.residual_connection = true, o.rescale_output_factor = 1.5;
  Generator gen(5);
  Attention attn(o, gen);
  randomize(attn, gen);
  const Tensor x4 = Tensor::randn({2, 8, 3, 5}, gen, F64);
  const Tensor out4 = attn.forward(Variable(x4)).tensor();
  EXPECT_EQ(out4.shape(), x4.shape());
  // [B, C, H, W] -> [B, H·W, C]
  const Tensor x3 = x4.reshape({2, 8, 15}).transpose(1, 2).contiguous();
  const Tensor out3 = attn.forward(Variable(x3)).tensor();
  EXPECT_EQ(out3.shape(), x3.shape());
  EXPECT_LE(rel_error(out4, out3.transpose(1, 2).contiguous().reshape({2, 8, 3, 5})), 1e-13);

  // The added-KV processor keeps the 4-D shape as well.
  AttentionOptions a = small_options();
  a.added_kv_proj_dim = 6, a.norm_num_groups = 2;
  Attention added(a, gen);
  const Variable ctx(Tensor::randn({2, 4, 6}, gen, F64));
  EXPECT_EQ(added.forward(Variable(x4), ctx).shape(), x4.shape());
}

TEST(AttentionLayer, MaskWhoseLastDimIsNotTheKeyCountIsAnError) {
  Generator gen(6);
  const Attention self(small_options(), gen);
  const Variable x(Tensor::randn({2, 5, 8}, gen, F64));
  for (const Shape& bad : {Shape{2, 1, 4}, Shape{2, 1, 6}, Shape{2, 4}, Shape{2, 5, 3}}) {
    const Tensor mask = Tensor::zeros(bad, F64);
    EXPECT_THAT(any_error_of([&] { self.forward(x, Variable(), mask); }), HasSubstr("mask")) << "mask of rank " << bad.size() << ", last dim " << bad.back();
  }
  AttentionOptions c = small_options();
  c.cross_attention_dim = 6;
  const Attention cross(c, gen);
  const Variable ctx(Tensor::randn({2, 3, 6}, gen, F64));
  // a self-attention-length mask on a cross-attention layer (K = 3, not 5): no padding
  EXPECT_THAT(any_error_of([&] { cross.forward(x, ctx, Tensor::zeros({2, 1, 5}, F64)); }), HasSubstr("mask"));
  EXPECT_THAT(any_error_of([&] { cross.forward(x, ctx, Tensor::zeros({2, 5, 2}, F64)); }), HasSubstr("mask"));
  // wrong batch, wrong query rows
  EXPECT_THAT(any_error_of([&] { cross.forward(x, ctx, Tensor::zeros({3, 1, 3}, F64)); }), HasSubstr("mask"));
  EXPECT_THAT(any_error_of([&] { cross.forward(x, ctx, Tensor::zeros({2, 4, 3}, F64)); }), HasSubstr("mask"));
  // added-KV: the mask covers context + self keys (3 + 5); the context length alone is an error
  AttentionOptions a = small_options();
  a.added_kv_proj_dim = 6, a.norm_num_groups = 2;
  const Attention added(a, gen);
  const Variable x_channels_first = transpose(x, 1, 2);  // added-KV reads [B, C, L], as diffusers does
  EXPECT_THAT(any_error_of([&] { added.forward(x_channels_first, ctx, Tensor::zeros({2, 1, 3}, F64)); }),
              HasSubstr("mask"));
  EXPECT_EQ(any_error_of([&] { added.forward(x_channels_first, ctx, Tensor::zeros({2, 1, 8}, F64)); }), "<no error>");
}

TEST(AttentionLayer, MaskShapesBroadcastAlike) {
  AttentionOptions c = small_options();
  c.cross_attention_dim = 6;
  Generator gen(8);
  Attention attn(c, gen);
  const Variable x(Tensor::randn({2, 5, 8}, gen, F64)), ctx(Tensor::randn({2, 3, 6}, gen, F64));
  const Tensor bk = Tensor::randn({2, 3}, gen, F64, Device::cpu(), 0.0, 3.0);
  const Tensor ref = attn.forward(x, ctx, bk.unsqueeze(1)).tensor();                           // (B, 1, K)
  EXPECT_LE(rel_error(attn.forward(x, ctx, bk).tensor(), ref), 1e-14);                          // (B, K)
  EXPECT_LE(rel_error(attn.forward(x, ctx, bk.unsqueeze(1).expand({2, 5, 3}).contiguous()).tensor(), ref),
            1e-14);                                                                             // (B, Q, K)
  EXPECT_GT(rel_error(attn.forward(x, ctx).tensor(), ref), 1e-6) << "the mask had no effect";
  // a batch-1 mask applies to every batch item
  const Tensor one = bk.slice(0, 0, 1).unsqueeze(1);  // (1, 1, K)
  EXPECT_LE(rel_error(attn.forward(x, ctx, one).tensor(),
                      attn.forward(x, ctx, one.expand({2, 1, 3}).contiguous()).tensor()),
            1e-14);
}

TEST(AttentionLayer, FullyMaskedRowIsTheUnmaskedSoftmaxNotNaN) {
  AttentionOptions c = small_options();
  c.cross_attention_dim = 6;
  Generator gen(9);
  Attention attn(c, gen);
  const Variable x(Tensor::randn({2, 5, 8}, gen, F64)), ctx(Tensor::randn({2, 3, 6}, gen, F64));
  const Tensor bias = keep_mask_to_bias(Tensor::zeros({2, 3}, F64), F64);  // every key dropped
  for (BackendKind kind : kCpuBackends) {
    ScopedAttentionBackend guard(kind);
    const Tensor out = attn.forward(x, ctx, bias).tensor();
    for (double v : out.to_vector()) ASSERT_TRUE(std::isfinite(v)) << backend_name(kind);
    EXPECT_LE(rel_error(out, attn.forward(x, ctx).tensor()), 1e-10) << backend_name(kind);
  }
}

TEST(AttentionLayer, KeepMaskToBias) {
  const Tensor m = Tensor::from_values({1, 0, 1, 0, 0.25, 1}, {2, 3}, F32);
  const Tensor b = keep_mask_to_bias(m, F64);
  EXPECT_EQ(b.dtype(), F64);
  EXPECT_EQ(b.shape(), m.shape());
  const std::vector<double> v = b.to_vector();
  const std::vector<double> expected{0, -10000, 0, -10000, -7500, 0};
  ASSERT_EQ(v.size(), expected.size());
  for (size_t i = 0; i < v.size(); ++i) EXPECT_EQ(v[i], expected[i]) << i;  // (1 − m)·(−10000), exactly
  const Tensor bi = keep_mask_to_bias(Tensor::from_values({1, 0, 0, 1}, {1, 4}, DType::I64), F32);
  EXPECT_EQ(bi.dtype(), F32);
  EXPECT_EQ(bi.to_vector(), (std::vector<double>{0, -10000, -10000, 0}));
  EXPECT_EQ(keep_mask_to_bias(Tensor::ones({3, 1, 2}, F64), F64).to_vector(), std::vector<double>(6, 0.0));
}

TEST(AttentionLayer, OnlyCrossAttentionNeedsAddedKV) {
  AttentionOptions o = small_options();
  o.only_cross_attention = true;  // diffusers raises a ValueError as well
  EXPECT_THAT(any_error_of([&] { Attention attn(o); }), HasSubstr("only_cross_attention"));
  o.added_kv_proj_dim = 6, o.norm_num_groups = 2;
  const Attention attn(o);
  EXPECT_FALSE(attn.has_projection("to_k"));
  EXPECT_FALSE(attn.has_projection("to_v"));
  EXPECT_TRUE(attn.has_projection("add_k_proj"));
  EXPECT_TRUE(attn.is_added_kv());
}

TEST(AttentionLayer, ContextWithTheWrongChannelsIsAnError) {
  AttentionOptions c = small_options();
  c.cross_attention_dim = 6;
  Generator gen(10);
  const Attention attn(c, gen);
  const Variable x(Tensor::randn({2, 5, 8}, gen, F64));
  EXPECT_NE(any_error_of([&] { attn.forward(x, Variable(Tensor::randn({2, 3, 5}, gen, F64))); }), "<no error>");
  EXPECT_NE(any_error_of([&] { attn.forward(x, Variable(Tensor::randn({1, 3, 6}, gen, F64))); }), "<no error>");
  EXPECT_NE(any_error_of([&] { attn.forward(Variable(Tensor::randn({2, 5, 7}, gen, F64))); }), "<no error>");
}

// Backend choice: the guard wins over the layer's override; the layer's override
// wins over the process default; an unknown backend name is an error that names it.
TEST(AttentionLayer, BackendOverridesAndNoSilentFallback) {
  Generator gen(11);
  Attention attn(small_options(), gen);
  const Variable x(Tensor::randn({2, 5, 8}, gen, F64));
  const Tensor ref = attn.forward(x).tensor();
  attn.set_backend(BackendKind::Flash);
  EXPECT_LE(rel_error(attn.forward(x).tensor(), ref), 1e-12);
  EXPECT_THAT(any_error_of([&] { parse_backend("cuda_flash", "--backend"); }), HasSubstr("--backend: unknown attention backend 'cuda_flash'"));
  {
    ScopedAttentionBackend guard(BackendKind::Math);
    EXPECT_LE(rel_error(attn.forward(x).tensor(), ref), 1e-12);
  }
  attn.set_backend(std::nullopt);
  EXPECT_LE(rel_error(attn.forward(x).tensor(), ref), 1e-12);
}

// Gradients with a per-layer backend or slicing equal the default ones.
TEST(AttentionLayer, GradientsAgreeAcrossBackendsAndSlicing) {
  const Fixture f = load_fixture("attn_cross_masked");
  const auto attn = attention_from_fixture(f);
  const Tensor x = input(f, "x"), ctx = input(f, "context"), mask = input(f, "mask");
  Generator gen(12);
  const Tensor up = Tensor::randn(output(f).shape(), gen, F64);
  auto grads = [&] {
    attn->zero_grad();
    Variable vx(x.clone(), true), vc(ctx.clone(), true);
    attn->forward(vx, vc, mask).backward(up);
    return std::vector<Tensor>{vx.grad(), vc.grad(), attn->find_parameter("to_k.weight").grad(),
                               attn->find_parameter("to_out.0.bias").grad()};
  };
  const std::vector<Tensor> ref = grads();
  for (BackendKind kind : kCpuBackends) {
    attn->set_backend(kind);
    const std::vector<Tensor> g = grads();
    for (size_t i = 0; i < g.size(); ++i) EXPECT_LE(rel_error(g[i], ref[i]), 1e-10) << backend_name(kind) << " " << i;
  }
  attn->set_backend(std::nullopt);
  attn->set_attention_slice(3);
  const std::vector<Tensor> g = grads();
  for (size_t i = 0; i < g.size(); ++i) EXPECT_LE(rel_error(g[i], ref[i]), 1e-10) << "sliced " << i;
}

}  // namespace
}  // namespace loom::attention
