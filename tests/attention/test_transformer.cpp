// BasicTransformerBlock and Transformer2DModel (SPEC §3) against diffusers
// itself: golden outputs (tests/fixtures/attention/block_*.json, t2d_*.json, made
// by tests/fixtures/make_attention_fixtures.py) in f64 and f32 with every CPU
// backend, diffusers' exact key names, config.json parsing, f64 gradient checks,
// masks, dropout, per-layer backends and slicing (ctest -L attention).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>

#include "attention/transformer.h"
#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "nn/norm.h"
#include "tensor/random.h"
#include "tests/fixtures/attention_fixture.h"

namespace loom::attention {
namespace {

using ::testing::AllOf;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using namespace loom::attention::testing;

constexpr DType F64 = DType::F64;
constexpr DType F32 = DType::F32;

void randomize(nn::Module& m, Generator& gen) {
  for (const auto& [name, p] : m.named_parameters()) {
    const bool norm_weight = name.find("norm") != std::string::npos && name.size() > 7 &&
                             name.compare(name.size() - 7, 7, ".weight") == 0;
    p.tensor().copy_(Tensor::randn(p.shape(), gen, p.dtype(), Device::cpu(), norm_weight ? 1.0 : 0.0, 0.5));
  }
}

// ---- golden numbers: Transformer2DModel --------------------------------------------------------

Transformer2DConfig config_of(const Fixture& f) {
  return Transformer2DConfig::from_json_text(f.config().dump(), f.name + "/config.json");
}

std::shared_ptr<Transformer2DModel> model_from_fixture(const Fixture& f) {
  Generator gen(1);
  auto model = std::make_shared<Transformer2DModel>(config_of(f), gen);
  model->to(F64);
  model->load_state_dict(state_dict(f, F64), /*strict=*/true);
  return model;
}

Tensor run_model(const Transformer2DModel& model, const Fixture& f, DType dtype) {
  NoGradGuard no_grad;
  const Tensor context = input(f, "context", dtype);
  return model
      .forward(Variable(input(f, "x", dtype)), context.defined() ? Variable(context) : Variable(),
               input(f, "encoder_attention_mask", dtype), input(f, "attention_mask", dtype))
      .tensor();
}

TEST(TransformerFixtures, AllCasesArePresent) {
  EXPECT_THAT(fixture_names("transformer2d"), ElementsAre("t2d_double_self_linear", "t2d_geglu_conv",
                                                          "t2d_gelu_approximate", "t2d_gelu_linear",
                                                          "t2d_only_cross_in8"));
  EXPECT_THAT(fixture_names("block"), ElementsAre("block_geglu_masked"));
}

class Transformer2DGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(Transformer2DGolden, ConfigParsesWithNotesForUnknownKeys) {
  const Fixture f = load_fixture(GetParam());
  const Transformer2DConfig c = config_of(f);
  const json& j = f.config();
  EXPECT_EQ(c.in_channels, j.at("in_channels").get<int64_t>());
  EXPECT_EQ(c.num_attention_heads, j.at("num_attention_heads").get<int64_t>());
  EXPECT_EQ(c.attention_head_dim, j.at("attention_head_dim").get<int64_t>());
  EXPECT_EQ(c.num_layers, j.at("num_layers").get<int64_t>());
  EXPECT_EQ(c.norm_num_groups, j.at("norm_num_groups").get<int64_t>());
  EXPECT_EQ(c.use_linear_projection, j.at("use_linear_projection").get<bool>());
  EXPECT_EQ(c.activation_fn, j.at("activation_fn").get<std::string>());
  EXPECT_EQ(c.cross_attention_dim.has_value(), !j.at("cross_attention_dim").is_null());
  EXPECT_FALSE(c.out_channels.has_value());  // null in diffusers' config.json
  // keys loom has no field for (sample_size, patch_size, ...) are each ignored with a note
  for (const char* key : {"sample_size", "patch_size", "num_vector_embeds", "attention_type"}) {
    ASSERT_TRUE(j.contains(key));
    bool noted = false;
    for (const std::string& note : c.notes) noted = noted || note.find(key) != std::string::npos;
    EXPECT_TRUE(noted) << "no note for '" << key << "'";
  }
  for (const std::string& note : c.notes) EXPECT_THAT(note, ::testing::Not(HasSubstr("'in_channels'")));
}

TEST_P(Transformer2DGolden, NamedParametersAreDiffusersKeys) {
  const Fixture f = load_fixture(GetParam());
  Generator gen(1);
  const Transformer2DModel model(config_of(f), gen);
  EXPECT_EQ(parameter_names(model), state_dict_keys(f));
  std::vector<std::string> keys;
  for (const auto& [k, v] : model.state_dict()) keys.push_back(k);
  EXPECT_EQ(keys, state_dict_keys(f));
}

TEST_P(Transformer2DGolden, F64EveryBackend) {
  const Fixture f = load_fixture(GetParam());
  const auto model = model_from_fixture(f);
  const Tensor ref = output(f);
  for (BackendKind kind : kCpuBackends) {
    ScopedAttentionBackend guard(kind);
    const Tensor out = run_model(*model, f, F64);
    EXPECT_EQ(out.shape(), ref.shape());
    EXPECT_LE(rel_error(out, ref), 1e-10) << GetParam() << " backend " << backend_name(kind);
  }
}

TEST_P(Transformer2DGolden, F32EveryBackend) {
  const Fixture f = load_fixture(GetParam());
  const auto model = model_from_fixture(f);
  model->to(F32);
  const Tensor ref = output(f);
  const std::vector<bool> dropped =
      fully_masked_items(input(f, "encoder_attention_mask"), /*keep_mask=*/true, ref.size(0));
  for (BackendKind kind : kCpuBackends) {
    ScopedAttentionBackend guard(kind);
    const Tensor out = run_model(*model, f, F32);
    ASSERT_EQ(out.dtype(), F32);
    ASSERT_EQ(out.shape(), ref.shape());
    for (int64_t b = 0; b < ref.size(0); ++b)
      EXPECT_LE(rel_error_of_item(out, ref, b), dropped[size_t(b)] ? 1e-3 : 1e-5)
          << GetParam() << " backend " << backend_name(kind) << " batch item " << b
          << (dropped[size_t(b)] ? " (every context token masked)" : "");
  }
}

// set_backend on every layer, and slicing on every layer, give the golden numbers.
TEST_P(Transformer2DGolden, PerLayerBackendAndSlicing) {
  const Fixture f = load_fixture(GetParam());
  const auto model = model_from_fixture(f);
  const Tensor ref = output(f);
  const auto layers = model->attention_layers();
  ASSERT_FALSE(layers.empty());
  for (BackendKind kind : kCpuBackends) {
    for (const auto& [name, attn] : layers) attn->set_backend(kind);
    EXPECT_LE(rel_error(run_model(*model, f, F64), ref), 1e-10) << "set_backend(" << backend_name(kind) << ")";
  }
  // mixed: a different backend per layer
  for (size_t i = 0; i < layers.size(); ++i) layers[i].second->set_backend(kCpuBackends[i % 3]);
  EXPECT_LE(rel_error(run_model(*model, f, F64), ref), 1e-10) << "mixed per-layer backends";
  for (const auto& [name, attn] : layers) attn->set_backend(std::nullopt);
  for (int64_t slice : {1, 3}) {
    for (const auto& [name, attn] : layers) attn->set_attention_slice(slice);
    EXPECT_LE(rel_error(run_model(*model, f, F64), ref), 1e-10) << "set_attention_slice(" << slice << ")";
  }
}

INSTANTIATE_TEST_SUITE_P(Diffusers, Transformer2DGolden, ::testing::ValuesIn(fixture_names("transformer2d")),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

// ---- golden numbers: BasicTransformerBlock -----------------------------------------------------

class BlockGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(BlockGolden, KeysAndF64F32EveryBackend) {
  const Fixture f = load_fixture(GetParam());
  Generator gen(1);
  BasicTransformerBlock block(block_options(f.config()), gen);
  EXPECT_EQ(parameter_names(block), state_dict_keys(f));
  EXPECT_TRUE(block.has_attn2());
  block.to(F64);
  block.load_state_dict(state_dict(f, F64), /*strict=*/true);
  const Tensor ref = output(f);
  for (DType dtype : {F64, F32}) {
    block.to(dtype);
    for (BackendKind kind : kCpuBackends) {
      ScopedAttentionBackend guard(kind);
      NoGradGuard no_grad;
      const Tensor out = block
                             .forward(Variable(input(f, "x", dtype)), Variable(input(f, "context", dtype)),
                                      input(f, "attention_mask", dtype), input(f, "encoder_attention_mask", dtype))
                             .tensor();
      EXPECT_EQ(out.dtype(), dtype);
      EXPECT_LE(rel_error(out, ref), dtype == F64 ? 1e-10 : 1e-5) << dtype << " " << backend_name(kind);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Diffusers, BlockGolden, ::testing::ValuesIn(fixture_names("block")),
                         [](const ::testing::TestParamInfo<std::string>& i) { return i.param; });

// ---- Transformer2DConfig --------------------------------------------------------------------------

const char* kMinimalConfig = R"({"in_channels": 8, "num_attention_heads": 2, "attention_head_dim": 4,
                                 "norm_num_groups": 4, "cross_attention_dim": 6})";

TEST(Transformer2DConfig, SpecDefaults) {
  const Transformer2DConfig c = Transformer2DConfig::from_json_text(kMinimalConfig);
  EXPECT_EQ(c.num_layers, 1);
  EXPECT_FALSE(c.use_linear_projection);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_FALSE(c.only_cross_attention);
  EXPECT_FALSE(c.upcast_attention);
  EXPECT_EQ(c.activation_fn, "geglu");
  EXPECT_TRUE(c.norm_elementwise_affine);
  EXPECT_EQ(c.dropout, 0.0);
  EXPECT_EQ(c.inner_dim(), 8);
  EXPECT_TRUE(c.notes.empty());
  EXPECT_EQ(Transformer2DConfig::from_json_text(R"({"in_channels": 64, "num_attention_heads": 2,
                                                    "attention_head_dim": 4})")
                .norm_num_groups,
            32);
}

TEST(Transformer2DConfig, MissingRequiredKeyIsAnErrorNamingIt) {
  for (const char* key : {"in_channels", "num_attention_heads", "attention_head_dim"}) {
    json j = json::parse(kMinimalConfig);
    j.erase(key);
    const std::string err = any_error_of([&] { Transformer2DConfig::from_json_text(j.dump(), "my/config.json"); });
    EXPECT_THAT(err, HasSubstr(key));
    EXPECT_THAT(err, HasSubstr("my/config.json"));
  }
}

TEST(Transformer2DConfig, UnknownKeyIsIgnoredWithANote) {
  json j = json::parse(kMinimalConfig);
  j["sample_size"] = 64;
  j["some_future_option"] = "x";
  j["_class_name"] = "Transformer2DModel";
  const Transformer2DConfig c = Transformer2DConfig::from_json_text(j.dump());
  ASSERT_EQ(c.notes.size(), 2u);  // metadata (leading "_") needs no note
  EXPECT_THAT(c.notes, Contains(HasSubstr("sample_size")));
  EXPECT_THAT(c.notes, Contains(HasSubstr("some_future_option")));
  EXPECT_EQ(c.in_channels, 8);
}

TEST(Transformer2DConfig, WrongTypeIsAnErrorNamingTheKey) {
  const std::vector<std::pair<std::string, json>> bad = {
      {"num_layers", "2"},          {"use_linear_projection", 1}, {"activation_fn", 3},
      {"norm_eps", "1e-5"},         {"cross_attention_dim", json::array({6})},
      {"in_channels", "8"},         {"attention_bias", "false"},  {"dropout", json::object()},
  };
  for (const auto& [key, value] : bad) {
    json j = json::parse(kMinimalConfig);
    j[key] = value;
    EXPECT_THAT(any_error_of([&] { Transformer2DConfig::from_json_text(j.dump()); }), HasSubstr(key))
        << key << " = " << value.dump();
  }
}

// A fractional value in an integer field is a wrong type too, not a silent truncation.
TEST(Transformer2DConfig, FractionalIntegerIsAnError) {
  for (const char* key : {"in_channels", "num_layers", "norm_num_groups", "cross_attention_dim"}) {
    json j = json::parse(kMinimalConfig);
    j[key] = 4.5;
    EXPECT_THAT(any_error_of([&] { Transformer2DConfig::from_json_text(j.dump()); }), HasSubstr(key)) << key << " = 4.5";
  }
}

TEST(Transformer2DConfig, NullMeansDefaultAndBadJsonOrFileIsAnError) {
  json j = json::parse(kMinimalConfig);
  j["out_channels"] = nullptr;
  j["cross_attention_dim"] = nullptr;
  const Transformer2DConfig c = Transformer2DConfig::from_json_text(j.dump());
  EXPECT_FALSE(c.out_channels.has_value());
  EXPECT_FALSE(c.cross_attention_dim.has_value());
  EXPECT_THAT(any_error_of([] { Transformer2DConfig::from_json_text("{not json", "cfg.json"); }), HasSubstr("cfg.json"));
  EXPECT_THAT(any_error_of([] { Transformer2DConfig::from_json_text("[1, 2]", "cfg.json"); }), HasSubstr("cfg.json"));
  EXPECT_THAT(any_error_of([] { Transformer2DConfig::from_file("/nonexistent/dir/config.json"); }),
              HasSubstr("/nonexistent/dir/config.json"));
}

TEST(Transformer2DConfig, OutOfRangeValuesAreErrorsNamingTheKey) {
  const std::vector<std::pair<std::string, json>> bad = {
      {"out_channels", 0},         {"out_channels", -2},       {"cross_attention_dim", 0},
      {"activation_fn", "relu"},   {"norm_eps", 0.0},          {"norm_eps", -1e-5},
      {"dropout", 1.0},            {"dropout", -0.5},          {"norm_num_groups", -4},
      {"num_attention_heads", int64_t(1) << 31}, {"attention_head_dim", int64_t(1) << 31},
      {"in_channels", int64_t(1) << 40}};
  for (const auto& [key, value] : bad) {
    json j = json::parse(kMinimalConfig);
    j[key] = value;
    EXPECT_THAT(any_error_of([&] { Transformer2DConfig::from_json_text(j.dump(), "my/config.json"); }),
                AllOf(HasSubstr("my/config.json"), HasSubstr("'" + key + "'")))
        << key << " = " << value.dump();
  }
}

TEST(Transformer2DConfig, AModelTooLargeToAllocateIsRefusedBeforeAllocation) {
  json j = json::parse(kMinimalConfig);
  j["num_attention_heads"] = 65536;  // inner dim 262144: about 1.2e12 parameters
  const std::string err = any_error_of([&] { Transformer2DConfig::from_json_text(j.dump(), "my/config.json"); });
  EXPECT_THAT(err, AllOf(HasSubstr("my/config.json"), HasSubstr("parameters"), HasSubstr("num_attention_heads")));
  // The bound is computed without overflow and covers what the model really holds.
  Transformer2DConfig c = Transformer2DConfig::from_json_text(kMinimalConfig);
  Generator gen(0);
  Transformer2DModel m(c, gen);
  int64_t n = 0;
  for (const auto& [name, p] : m.named_parameters()) n += p.tensor().numel();
  EXPECT_GE(c.parameter_count_bound(), (long double)n);
  EXPECT_LE(c.parameter_count_bound(), 2.0L * (long double)n);
}

TEST(Transformer2DConfig, AConfigThatIsADirectoryIsReportedAsSuch) {
  EXPECT_THAT(any_error_of([] { Transformer2DConfig::from_file(::testing::TempDir()); }), HasSubstr("is a directory"));
}

TEST(Transformer2DConfig, FromFileReadsTheFixtureConfig) {
  // A diffusers config.json as save_pretrained writes it, through a real file.
  const Fixture f = load_fixture("t2d_gelu_linear");
  const std::string path = ::testing::TempDir() + "loom_t2d_config.json";
  {
    std::ofstream out(path);
    out << f.config().dump(2);
  }
  const Transformer2DConfig c = Transformer2DConfig::from_file(path);
  EXPECT_TRUE(c.use_linear_projection);
  EXPECT_EQ(c.activation_fn, "gelu");
  EXPECT_EQ(c.cross_attention_dim, std::optional<int64_t>(12));
  std::remove(path.c_str());
}

// ---- model behaviour ------------------------------------------------------------------------------

Transformer2DConfig tiny_config(bool linear = false, const std::string& activation = "geglu") {
  Transformer2DConfig c;
  c.in_channels = 4, c.num_attention_heads = 2, c.attention_head_dim = 2, c.norm_num_groups = 2;
  c.num_layers = 2, c.cross_attention_dim = 5, c.use_linear_projection = linear, c.activation_fn = activation;
  return c;
}

TEST(Transformer2DModel, AttentionLayersAndShapes) {
  Generator gen(20);
  const Transformer2DModel model(tiny_config(), gen, F64);
  std::vector<std::string> names;
  for (const auto& [name, attn] : model.attention_layers()) names.push_back(name);
  EXPECT_THAT(names, ElementsAre("transformer_blocks.0.attn1", "transformer_blocks.0.attn2",
                                 "transformer_blocks.1.attn1", "transformer_blocks.1.attn2"));
  EXPECT_EQ(model.find_parameter("proj_in.weight").shape(), (Shape{4, 4, 1, 1}));  // 1×1 conv layout
  const Transformer2DModel linear(tiny_config(true), gen, F64);
  EXPECT_EQ(linear.find_parameter("proj_in.weight").shape(), (Shape{4, 4}));
  const Variable x(Tensor::randn({2, 4, 3, 2}, gen, F64)), ctx(Tensor::randn({2, 3, 5}, gen, F64));
  EXPECT_EQ(model.forward(x, ctx).shape(), x.shape());
  EXPECT_EQ(linear.forward(x, ctx).shape(), x.shape());
}

TEST(Transformer2DModel, DropoutDefaultsToZeroAndEvalMakesItInert) {
  Generator gen(21);
  Transformer2DConfig c = tiny_config();
  Transformer2DModel plain(c, gen, F64);
  int dropouts = 0;
  for (const auto& [name, m] : plain.named_modules())
    if (auto d = std::dynamic_pointer_cast<nn::Dropout>(m)) {
      EXPECT_EQ(d->p(), 0.0) << name;
      ++dropouts;
    }
  EXPECT_GT(dropouts, 0);
  c.dropout = 0.4;
  Transformer2DModel dropping(c, gen, F64);
  dropping.load_state_dict(plain.state_dict());
  for (const auto& [name, m] : dropping.named_modules())
    if (auto d = std::dynamic_pointer_cast<nn::Dropout>(m)) {
      EXPECT_EQ(d->p(), 0.4) << name;
    }
  const Variable x(Tensor::randn({1, 4, 3, 3}, gen, F64)), ctx(Tensor::randn({1, 3, 5}, gen, F64));
  const Tensor ref = plain.forward(x, ctx).tensor();
  EXPECT_EQ(plain.forward(x, ctx).tensor().to_vector(), ref.to_vector());  // training, p = 0: deterministic
  EXPECT_GT(rel_error(dropping.forward(x, ctx).tensor(), ref), 1e-4);
  dropping.eval();
  EXPECT_EQ(dropping.forward(x, ctx).tensor().to_vector(), ref.to_vector());
}

// A 2-D encoder mask is a keep-mask: the same as its (1 − m)·(−10000) bias given as (B, 1, K).
TEST(Transformer2DModel, KeepMaskEqualsItsBias) {
  Generator gen(22);
  Transformer2DModel model(tiny_config(), gen, F64);
  randomize(model, gen);
  const Variable x(Tensor::randn({2, 4, 3, 3}, gen, F64)), ctx(Tensor::randn({2, 3, 5}, gen, F64));
  const Tensor keep = Tensor::from_values({1, 0, 1, 0, 0, 0}, {2, 3}, F64);
  const Tensor out = model.forward(x, ctx, keep).tensor();
  EXPECT_LE(rel_error(out, model.forward(x, ctx, keep_mask_to_bias(keep, F64).unsqueeze(1)).tensor()), 1e-14);
  EXPECT_GT(rel_error(out, model.forward(x, ctx).tensor()), 1e-6) << "the mask had no effect";
  // batch item 1 has every token dropped: it gets the unmasked softmax (finite, not NaN)
  for (double v : out.to_vector()) ASSERT_TRUE(std::isfinite(v));
  EXPECT_LE(rel_error_of_item(out, model.forward(x, ctx).tensor(), 1), 1e-10);
  // a keep-mask whose length is not the context length is an error naming the mask
  EXPECT_THAT(any_error_of([&] { model.forward(x, ctx, Tensor::ones({2, 4}, F64)); }), HasSubstr("mask"));
}

TEST(Transformer2DModel, WrongInputIsAnError) {
  Generator gen(23);
  const Transformer2DModel model(tiny_config(), gen, F64);
  const Variable ctx(Tensor::randn({1, 3, 5}, gen, F64));
  EXPECT_NE(any_error_of([&] { model.forward(Variable(Tensor::randn({1, 6, 3, 3}, gen, F64)), ctx); }), "<no error>");
  EXPECT_NE(any_error_of([&] { model.forward(Variable(Tensor::randn({1, 9, 4}, gen, F64)), ctx); }), "<no error>");
}

TEST(Transformer2DModel, StrictLoadOfAnotherShapeNamesTheKey) {
  const Fixture f = load_fixture("t2d_geglu_conv");
  Transformer2DConfig c = config_of(f);
  c.cross_attention_dim = 10;  // to_k / to_v of attn2 are (16, 10), not (16, 12)
  Transformer2DModel model(c);
  model.to(F64);
  EXPECT_THAT(any_error_of([&] { model.load_state_dict(state_dict(f)); }), HasSubstr("attn2.to_k.weight"));
}

// ---- f64 gradient checks ------------------------------------------------------------------------

TEST(BasicTransformerBlock, Gradcheck) {
  for (const char* activation : {"geglu", "gelu", "gelu-approximate"})
    for (BackendKind kind : {BackendKind::Math, BackendKind::Flash}) {
      Generator gen(30);
      BasicTransformerBlockOptions o;
      o.dim = 4, o.heads = 2, o.dim_head = 2, o.cross_attention_dim = 5, o.activation_fn = activation;
      o.attention_bias = true, o.dtype = F64;
      BasicTransformerBlock block(o, gen);
      randomize(block, gen);
      const Tensor self_bias = Tensor::from_values({0, -10000, 0}, {1, 1, 3}, F64);
      const Tensor enc_bias = Tensor::randn({1, 3, 2}, gen, F64);  // (B, Q, K)
      std::vector<Variable> inputs{Variable(Tensor::randn({1, 3, 4}, gen, F64), true),
                                   Variable(Tensor::randn({1, 2, 5}, gen, F64), true)};
      for (const char* name : {"norm1.weight", "attn1.to_v.weight", "attn2.to_k.weight", "attn2.to_out.0.bias",
                               "norm3.bias", "ff.net.0.proj.weight", "ff.net.2.bias"}) {
        const Variable p = block.find_parameter(name);
        ASSERT_TRUE(p.defined()) << name;
        inputs.push_back(p);
      }
      ScopedAttentionBackend guard(kind);
      const GradcheckResult r = gradcheck(
          [&](const std::vector<Variable>& in) { return block.forward(in[0], in[1], self_bias, enc_bias); }, inputs);
      EXPECT_TRUE(r.ok) << activation << " " << backend_name(kind) << ": " << r.message;
    }
}

class Transformer2DGradcheck : public ::testing::TestWithParam<BackendKind> {};

TEST_P(Transformer2DGradcheck, TwoLayersInputContextAndParameters) {
  for (bool linear : {false, true}) {
    Generator gen(40);
    Transformer2DModel model(tiny_config(linear), gen);
    model.to(F64);
    randomize(model, gen);
    const Tensor keep = Tensor::from_values({1, 0, 1}, {1, 3}, F64);
    std::vector<Variable> inputs{Variable(Tensor::randn({1, 4, 3, 3}, gen, F64), true),
                                 Variable(Tensor::randn({1, 3, 5}, gen, F64), true)};
    for (const char* name : {"norm.weight", "proj_in.weight", "transformer_blocks.0.attn1.to_q.weight",
                             "transformer_blocks.1.attn2.to_k.weight", "transformer_blocks.0.ff.net.0.proj.bias",
                             "transformer_blocks.1.norm2.weight", "proj_out.bias"}) {
      const Variable p = model.find_parameter(name);
      ASSERT_TRUE(p.defined()) << name;
      ASSERT_EQ(p.dtype(), F64);
      inputs.push_back(p);
    }
    ScopedAttentionBackend guard(GetParam());
    const GradcheckResult r = gradcheck(
        [&](const std::vector<Variable>& in) { return model.forward(in[0], in[1], keep); }, inputs);
    EXPECT_TRUE(r.ok) << (linear ? "linear" : "conv") << " projection: " << r.message;
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, Transformer2DGradcheck, ::testing::Values(BackendKind::Math, BackendKind::Flash),
                         [](const ::testing::TestParamInfo<BackendKind>& i) { return backend_name(i.param); });

}  // namespace
}  // namespace loom::attention
