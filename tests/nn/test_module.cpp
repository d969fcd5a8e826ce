// nn::Module: names, state dicts and their load reports, modes, freezing,
// device/dtype moves, replacement (ctest -L nn).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "autograd/ops.h"
#include "nn/feedforward.h"
#include "nn/linear.h"
#include "nn/norm.h"
#include "tests/test_helpers.h"

namespace loom::nn {
namespace {

using loom::testing::error_of;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::vector<std::string> keys_of(const std::vector<std::pair<std::string, Variable>>& named) {
  std::vector<std::string> keys;
  for (const auto& e : named) keys.push_back(e.first);
  return keys;
}

// A small tree shaped like a transformer block: own parameter and buffer,
// a list of blocks, each with a norm and a linear.
class ToyBlock : public Module {
 public:
  ToyBlock(Generator& gen, DType dtype) {
    norm = register_module("norm", std::make_shared<LayerNorm>(3, 1e-5, true, dtype));
    to_q = register_module("to_q", std::make_shared<Linear>(3, 4, /*bias=*/false, gen, dtype));
  }
  std::string type_name() const override { return "ToyBlock"; }
  std::shared_ptr<LayerNorm> norm;
  std::shared_ptr<Linear> to_q;
};

class ToyModel : public Module {
 public:
  explicit ToyModel(uint64_t seed = 0, DType dtype = DType::F32) {
    Generator gen(seed);
    scale = register_parameter("scale", Tensor::rand({2}, gen, dtype));
    register_buffer("steps", Tensor::zeros({1}, DType::I64));
    register_buffer("running", Tensor::ones({2}, dtype));
    blocks = register_module("transformer_blocks", std::make_shared<ModuleList>());
    blocks->push_back(std::make_shared<ToyBlock>(gen, dtype));
    blocks->push_back(std::make_shared<ToyBlock>(gen, dtype));
    proj_out = register_module("proj_out", std::make_shared<Linear>(4, 3, true, gen, dtype));
  }
  std::string type_name() const override { return "ToyModel"; }
  Variable scale;
  std::shared_ptr<ModuleList> blocks;
  std::shared_ptr<Linear> proj_out;
};

TEST(Module, NamedParametersAreDottedAndInRegistrationOrder) {
  ToyModel m;
  EXPECT_THAT(keys_of(m.named_parameters()),
              ElementsAre("scale", "transformer_blocks.0.norm.weight", "transformer_blocks.0.norm.bias",
                          "transformer_blocks.0.to_q.weight", "transformer_blocks.1.norm.weight",
                          "transformer_blocks.1.norm.bias", "transformer_blocks.1.to_q.weight", "proj_out.weight",
                          "proj_out.bias"));
  EXPECT_EQ(m.parameters().size(), 9u);
  EXPECT_EQ(m.num_parameters(), 2 + 2 * (3 + 3 + 12) + 12 + 3);
  std::vector<std::string> buffers;
  for (const auto& b : m.named_buffers()) buffers.push_back(b.first);
  EXPECT_THAT(buffers, ElementsAre("steps", "running"));
  std::vector<std::string> modules;
  for (const auto& e : m.named_modules()) modules.push_back(e.first);
  EXPECT_THAT(modules, ElementsAre("transformer_blocks", "transformer_blocks.0", "transformer_blocks.0.norm",
                                   "transformer_blocks.0.to_q", "transformer_blocks.1", "transformer_blocks.1.norm",
                                   "transformer_blocks.1.to_q", "proj_out"));
  std::vector<std::string> children;
  for (const auto& e : m.named_children()) children.push_back(e.first);
  EXPECT_THAT(children, ElementsAre("transformer_blocks", "proj_out"));
}

TEST(Module, LookupByNameAndPath) {
  ToyModel m;
  EXPECT_EQ(m.child("proj_out"), m.proj_out);
  EXPECT_EQ(m.find_module("transformer_blocks.1.to_q"), m.blocks->at_as<ToyBlock>(1)->to_q);
  EXPECT_EQ(m.find_module("transformer_blocks.7"), nullptr);
  EXPECT_EQ(m.find_parameter("transformer_blocks.0.to_q.weight").impl(),
            m.blocks->at_as<ToyBlock>(0)->to_q->weight().impl());
  EXPECT_FALSE(m.find_parameter("transformer_blocks.0.to_q.bias").defined());
  EXPECT_FALSE(m.find_parameter("nope.weight").defined());
  EXPECT_EQ(m.parameter("scale").impl(), m.scale.impl());
  EXPECT_EQ(m.buffer("steps").dtype(), DType::I64);
  EXPECT_THAT(error_of([&] { m.child("to_k"); }), HasSubstr("no child module 'to_k' (children: transformer_blocks, proj_out)"));
  EXPECT_THAT(error_of([&] { m.child_as<Linear>("transformer_blocks"); }), HasSubstr("is a ModuleList"));
  EXPECT_THAT(error_of([&] { m.blocks->at(2); }), HasSubstr("index 2 out of range"));
}

TEST(Module, RegistrationRejectsBadAndDuplicateNames) {
  ToyModel m;
  EXPECT_THAT(error_of([&] { m.register_parameter("scale", Tensor::zeros({1})); }), HasSubstr("already in use"));
  EXPECT_THAT(error_of([&] { m.register_buffer("proj_out", Tensor::zeros({1})); }), HasSubstr("already in use"));
  EXPECT_THAT(error_of([&] { m.register_parameter("a.b", Tensor::zeros({1})); }), HasSubstr("invalid parameter name 'a.b'"));
  EXPECT_THAT(error_of([&] { m.register_module("", std::make_shared<Dropout>(0.1)); }), HasSubstr("invalid module name"));
}

TEST(Module, StateDictRoundTripCopiesIntoTheSameVariables) {
  ToyModel a(1), b(2);
  const Variable w_before = b.proj_out->weight();
  ASSERT_NE(a.proj_out->weight().tensor().to_vector(), w_before.tensor().to_vector());
  const std::map<std::string, Tensor> sd = a.state_dict();
  EXPECT_EQ(sd.size(), 11u);  // 9 parameters + 2 buffers
  const LoadReport r = b.load_state_dict(sd);
  EXPECT_TRUE(r.ok());
  EXPECT_EQ(r.matched.size(), 11u);
  for (const auto& [key, value] : b.state_dict()) EXPECT_EQ(value.to_vector(), sd.at(key).to_vector()) << key;
  // Same handle, same leaf, still trainable: optimizers holding it keep working.
  EXPECT_EQ(b.proj_out->weight().impl(), w_before.impl());
  EXPECT_TRUE(w_before.is_leaf() && w_before.requires_grad());
  // The loaded values are copies, not aliases of the source.
  a.proj_out->weight().tensor().fill_(7.0);
  EXPECT_NE(b.proj_out->weight().tensor().to_vector()[0], 7.0);
}

TEST(Module, LoadConvertsDtypeAndKeepsTheModelsDtype) {
  ToyModel f64_model(3, DType::F64), f32_model(4);
  f32_model.load_state_dict(f64_model.state_dict());
  EXPECT_EQ(f32_model.proj_out->weight().dtype(), DType::F32);
  const auto want = f64_model.proj_out->weight().tensor().to_vector();
  const auto got = f32_model.proj_out->weight().tensor().to_vector();
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-7);
}

TEST(Module, StrictLoadNamesShapeMismatchWithBothShapes) {
  ToyModel m;
  auto sd = m.state_dict();
  const auto before = m.blocks->at_as<ToyBlock>(0)->to_q->weight().tensor().to_vector();
  sd["transformer_blocks.0.to_q.weight"] = Tensor::zeros({3, 4});  // model: [4, 3]
  const std::string msg = error_of([&] { m.load_state_dict(sd); });
  EXPECT_THAT(msg, HasSubstr("'transformer_blocks.0.to_q.weight'"));
  EXPECT_THAT(msg, HasSubstr("[4, 3]"));
  EXPECT_THAT(msg, HasSubstr("[3, 4]"));
  EXPECT_THAT(msg, HasSubstr("wrong base model?"));
  // Strict failure copies nothing.
  EXPECT_EQ(m.blocks->at_as<ToyBlock>(0)->to_q->weight().tensor().to_vector(), before);
}

TEST(Module, StrictLoadNamesMissingAndUnexpectedKeys) {
  ToyModel m;
  auto missing = m.state_dict();
  missing.erase("proj_out.bias");
  std::string msg = error_of([&] { m.load_state_dict(missing); });
  EXPECT_THAT(msg, HasSubstr("missing key 'proj_out.bias'"));
  EXPECT_THAT(msg, HasSubstr("[3]"));
  EXPECT_THAT(msg, HasSubstr("wrong base model?"));

  auto extra = m.state_dict();
  extra["transformer_blocks.0.to_k.weight"] = Tensor::zeros({4, 3});
  msg = error_of([&] { m.load_state_dict(extra); });
  EXPECT_THAT(msg, HasSubstr("unexpected key 'transformer_blocks.0.to_k.weight'"));
  EXPECT_THAT(msg, HasSubstr("wrong base model?"));
}

TEST(Module, NonStrictLoadReportsEverythingAndCopiesTheRest) {
  ToyModel src(5), m(6);
  auto sd = src.state_dict();
  sd.erase("scale");
  sd["extra.weight"] = Tensor::zeros({2});
  sd["proj_out.weight"] = Tensor::zeros({4, 3});  // model: [3, 4]
  const auto scale_before = m.scale.tensor().to_vector();
  const auto w_before = m.proj_out->weight().tensor().to_vector();
  const LoadReport r = m.load_state_dict(sd, /*strict=*/false);
  EXPECT_FALSE(r.ok());
  EXPECT_THAT(r.missing, ElementsAre("scale"));
  EXPECT_THAT(r.unexpected, ElementsAre("extra.weight"));
  ASSERT_EQ(r.shape_mismatches.size(), 1u);
  EXPECT_EQ(r.shape_mismatches[0].key, "proj_out.weight");
  EXPECT_EQ(r.shape_mismatches[0].expected, (Shape{3, 4}));
  EXPECT_EQ(r.shape_mismatches[0].got, (Shape{4, 3}));
  EXPECT_EQ(r.matched.size(), 9u);
  EXPECT_EQ(r.summary(), "9 matched, 1 missing, 1 unexpected, 1 shape mismatches");
  EXPECT_EQ(m.scale.tensor().to_vector(), scale_before);
  EXPECT_EQ(m.proj_out->weight().tensor().to_vector(), w_before);
  EXPECT_EQ(m.proj_out->bias().tensor().to_vector(), src.proj_out->bias().tensor().to_vector());
}

TEST(Module, NonStrictShapeMismatchRecordsBothShapes) {
  ToyModel m;
  auto sd = m.state_dict();
  sd["transformer_blocks.1.to_q.weight"] = Tensor::zeros({3, 4});
  const LoadReport r = m.load_state_dict(sd, false);
  ASSERT_EQ(r.shape_mismatches.size(), 1u);
  EXPECT_EQ(r.shape_mismatches[0].expected, (Shape{4, 3}));
  EXPECT_EQ(r.shape_mismatches[0].got, (Shape{3, 4}));
}

TEST(Module, FrozenSubtreeGetsNoGradient) {
  ToyModel m(0, DType::F64);
  m.blocks->set_requires_grad(false);
  const auto block = m.blocks->at_as<ToyBlock>(0);
  Variable x(Tensor::ones({2, 3}, DType::F64), true);
  Variable y = m.proj_out->forward(block->to_q->forward(block->norm->forward(x)));
  sum(y).backward();
  EXPECT_FALSE(block->to_q->weight().grad().defined());
  EXPECT_FALSE(block->norm->weight().grad().defined());
  EXPECT_TRUE(m.proj_out->weight().grad().defined());
  EXPECT_TRUE(x.grad().defined());
  EXPECT_EQ(m.num_parameters(/*trainable_only=*/true), 2 + 12 + 3);
  m.zero_grad();
  EXPECT_FALSE(m.proj_out->weight().grad().defined());
}

TEST(Module, TrainEvalIsRecursiveAndTogglesDropout) {
  FeedForward ff(4, 4, 2, "gelu", /*dropout=*/0.5);
  const auto drop = ff.net()->at(1);
  EXPECT_TRUE(ff.is_training() && drop->is_training());
  Generator gen(11);
  set_dropout_generator(ff, gen);
  Variable x(Tensor::ones({64}));
  const auto dropped = std::dynamic_pointer_cast<Dropout>(drop);
  ASSERT_TRUE(dropped);
  const auto train_out = dropped->forward(x).tensor().to_vector();
  int zeros = 0;
  for (double v : train_out) {
    EXPECT_TRUE(v == 0.0 || v == 2.0) << v;
    zeros += v == 0.0;
  }
  EXPECT_GT(zeros, 10);
  EXPECT_LT(zeros, 54);
  ff.eval();
  EXPECT_FALSE(drop->is_training());
  EXPECT_EQ(dropped->forward(x).tensor().to_vector(), std::vector<double>(64, 1.0));
  ff.train();
  EXPECT_TRUE(drop->is_training());
}

TEST(Module, ToF64ConvertsParametersAndFloatBuffersInPlace) {
  ToyModel m;
  const Variable w = m.proj_out->weight();
  const auto values = w.tensor().to_vector();
  sum(m.proj_out->forward(Variable(Tensor::ones({1, 4})))).backward();
  m.to(DType::F64);
  EXPECT_EQ(w.dtype(), DType::F64);  // the same handle sees the new data
  EXPECT_EQ(m.proj_out->weight().impl(), w.impl());
  EXPECT_TRUE(w.is_leaf() && w.requires_grad());
  EXPECT_EQ(w.grad().dtype(), DType::F64);
  const auto converted = w.tensor().to_vector();
  for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ(converted[i], values[i]);  // f32 -> f64 is exact
  for (const auto& [name, p] : m.named_parameters()) EXPECT_EQ(p.dtype(), DType::F64) << name;
  EXPECT_EQ(m.buffer("running").dtype(), DType::F64);
  EXPECT_EQ(m.buffer("steps").dtype(), DType::I64);  // integer buffers keep their dtype
  const Variable y = m.proj_out->forward(Variable(Tensor::ones({1, 4}, DType::F64)));
  EXPECT_EQ(y.dtype(), DType::F64);
  m.to(Device::cpu());  // a no-op move keeps everything
  EXPECT_EQ(w.dtype(), DType::F64);
}

TEST(Module, ReplaceModuleKeepsTheSlotAndTheName) {
  ToyModel m;
  Generator gen(3);
  auto fresh = std::make_shared<Linear>(3, 4, false, gen);
  m.replace_module("transformer_blocks.0.to_q", fresh);
  EXPECT_EQ(m.find_module("transformer_blocks.0.to_q"), fresh);
  EXPECT_EQ(m.find_parameter("transformer_blocks.0.to_q.weight").impl(), fresh->weight().impl());
  EXPECT_EQ(keys_of(m.named_parameters())[3], "transformer_blocks.0.to_q.weight");
  EXPECT_THAT(error_of([&] { m.replace_module("transformer_blocks.0.to_k", fresh); }), HasSubstr("no child 'to_k'"));
  EXPECT_THAT(error_of([&] { m.replace_module("nope.to_q", fresh); }), HasSubstr("no module 'nope'"));
}

TEST(Module, SequentialRefusesANonUnaryReplacement) {
  FeedForward ff(3, 3, 2, "gelu");
  EXPECT_THAT(error_of([&] { ff.replace_module("net.1", std::make_shared<ModuleList>()); }),
              HasSubstr("not a one-input module"));
  ff.replace_module("net.1", std::make_shared<Dropout>(0.0));  // a UnaryModule is fine
}

TEST(Module, SetParameterDataReplacesTheTensorInsideTheHandle) {
  ToyModel m;
  const Variable b = m.proj_out->bias();
  sum(m.proj_out->forward(Variable(Tensor::ones({1, 4})))).backward();
  m.set_parameter_data("proj_out.bias", Tensor::from_values({1, 2, 3}, {3}, DType::F64));
  EXPECT_EQ(b.tensor().to_vector(), (std::vector<double>{1, 2, 3}));
  EXPECT_EQ(b.dtype(), DType::F64);
  EXPECT_FALSE(b.grad().defined());
  EXPECT_THAT(error_of([&] { m.set_parameter_data("proj_out.bias", Tensor::zeros({4})); }),
              HasSubstr("has shape [3]"));
  EXPECT_THAT(error_of([&] { m.set_parameter_data("proj_out.gain", Tensor::zeros({3})); }),
              HasSubstr("no parameter 'proj_out.gain'"));
}

TEST(Module, SharedParameterIsListedOnceButSavedUnderEachName) {
  Module m;
  Generator gen(0);
  auto lin = std::make_shared<Linear>(2, 2, true, gen);
  m.register_module("a", lin);
  m.register_module("b", lin);
  EXPECT_THAT(keys_of(m.named_parameters()), ElementsAre("a.weight", "a.bias"));
  EXPECT_EQ(m.state_dict().size(), 4u);
}

}  // namespace
}  // namespace loom::nn
