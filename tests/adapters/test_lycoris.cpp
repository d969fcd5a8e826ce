// LyCORIS (LoHa, LoKr) and DoRA adapters through the adapter choke point (adapters/lycoris.h):
// golden outputs of tests/adapters/fixtures/lycoris (made by make_lycoris_fixtures.py with torch,
// diffusers and PEFT in f64) on a Transformer2DModel and on a 3×3 Conv2d, in f64 (1e-10) and f32
// (1e-5); fused == unfused; weight 0 gives the base; weights and several adapters; `loom run`'s
// path (trainer::run_model); conversion; malformed files; f64 gradient checks.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>

#include "adapters/lora.h"
#include "adapters/lycoris.h"
#include "autograd/gradcheck.h"
#include "io/adapter_io.h"
#include "nn/conv.h"
#include "tests/test_helpers.h"
#include "trainer/run.h"
#include "trainer/trainer.h"

namespace loom {
namespace {

using adapters::LoraModule;
using adapters::LoraSet;
using adapters::ModuleKind;
using loom::testing::error_of;
using loom::testing::rel_error;
using loom::testing::TempDir;
using ::testing::HasSubstr;

constexpr DType F64 = DType::F64;
constexpr DType F32 = DType::F32;

std::string fixture(const std::string& name) { return std::string(LOOM_LYCORIS_FIXTURES) + "/" + name; }

const io::TensorFile& inputs() {
  static const io::TensorFile f = io::read_safetensors(fixture("inputs.safetensors"));
  return f;
}

Tensor golden(const std::string& name) { return inputs().find(name)->to(F64); }

std::shared_ptr<attention::Transformer2DModel> model(DType dtype) {
  auto m = io::load_model_dir(fixture("model"), "", dtype);
  m->eval();
  return m;
}

Tensor forward(const attention::Transformer2DModel& m, DType dtype) {
  NoGradGuard no_grad;
  return m.forward(Variable(inputs().find("hidden_states")->to(dtype)),
                   Variable(inputs().find("encoder_hidden_states")->to(dtype)))
      .tensor()
      .to(F64);
}

// The adapter files and the golden output each one gives at weight 1.
const std::vector<std::pair<std::string, std::string>>& cases() {
  static const std::vector<std::pair<std::string, std::string>> c = {{"loha.safetensors", "loha"},
                                                                     {"lokr_full.safetensors", "lokr_full"},
                                                                     {"lokr_factored.safetensors", "lokr_factored"},
                                                                     {"dora_peft.safetensors", "dora_peft"},
                                                                     {"dora_kohya.safetensors", "dora_kohya"}};
  return c;
}

TEST(Lycoris, MatchesTheGoldensInF64FusesExactlyAndWeightZeroIsTheBase) {
  for (const auto& [file, name] : cases()) {
    SCOPED_TRACE(file);
    auto m = model(F64);
    const Tensor base = forward(*m, F64);
    EXPECT_LE(rel_error(base, golden("base")), 1e-12);
    LoraSet set(m);
    const io::AdapterLoadReport report = io::load_lora(set, "a", fixture(file));
    EXPECT_TRUE(report.clean()) << report.summary();
    EXPECT_FALSE(report.kinds.empty()) << report.summary();  // LoHa / LoKr / LoRA+DoRA modules reported
    const Tensor adapted = forward(*m, F64);
    EXPECT_LE(rel_error(adapted, golden(name)), 1e-10);
    EXPECT_GT(rel_error(adapted, base), 1e-3);  // the adapter does something

    const Tensor w_before = m->find_parameter("transformer_blocks.0.attn2.to_out.0.weight").tensor().clone();
    set.fuse();
    const Tensor fused = forward(*m, F64);
    EXPECT_LE(rel_error(fused, adapted), 1e-12);
    EXPECT_LE(rel_error(fused, golden(name)), 1e-10);
    set.unfuse();
    EXPECT_EQ(m->find_parameter("transformer_blocks.0.attn2.to_out.0.weight").tensor().to_vector(),
              w_before.to_vector());
    EXPECT_EQ(forward(*m, F64).to_vector(), adapted.to_vector());

    set.set_weight("a", 0.0);
    EXPECT_EQ(forward(*m, F64).to_vector(), base.to_vector());  // weight 0: the base bit for bit
  }
}

TEST(Lycoris, MatchesTheGoldensInF32) {
  for (const auto& [file, name] : cases()) {
    SCOPED_TRACE(file);
    auto m = model(F32);
    LoraSet set(m);
    io::load_lora(set, "a", fixture(file));
    EXPECT_LE(rel_error(forward(*m, F32), golden(name)), 1e-5);
    set.fuse();
    EXPECT_LE(rel_error(forward(*m, F32), golden(name)), 1e-5);
  }
}

TEST(Lycoris, AdapterWeightsAndSeveralAdaptersAdd) {
  auto m = model(F64);
  LoraSet set(m);
  io::load_lora(set, "loha", fixture("loha.safetensors"));
  set.set_weight("loha", 0.5);
  EXPECT_LE(rel_error(forward(*m, F64), golden("loha_w05")), 1e-10);
  set.set_weight("loha", 1.0);
  io::load_lora(set, "lokr", fixture("lokr_factored.safetensors"));
  set.set_weight("lokr", 0.5);
  EXPECT_LE(rel_error(forward(*m, F64), golden("loha_plus_lokr_w05")), 1e-10);
  set.fuse();
  EXPECT_LE(rel_error(forward(*m, F64), golden("loha_plus_lokr_w05")), 1e-10);
}

TEST(Lycoris, KindsRanksAndScalesAsLycorisDefinesThem) {
  auto m = model(F64);
  LoraSet set(m);
  io::load_lora(set, "full", fixture("lokr_full.safetensors"));
  io::load_lora(set, "loha", fixture("loha.safetensors"));
  const LoraModule& full = set.adapter("full").module("transformer_blocks.0.attn1.to_q");
  EXPECT_EQ(full.kind, ModuleKind::LoKr);
  EXPECT_EQ(full.rank, 0);
  EXPECT_EQ(full.scale(), 1.0);  // both factors full: scale 1 whatever the alpha (5 in the file)
  ASSERT_TRUE(full.alpha.has_value());
  EXPECT_EQ(*full.alpha, 5.0);
  // The fixture's LoHa alphas cycle 1.5, 3, none, 0 over its modules; ranks 2, 3, 2, 3.
  const auto& loha = set.adapter("loha").modules();
  EXPECT_EQ(loha.at("transformer_blocks.0.attn1.to_q").kind, ModuleKind::LoHa);
  EXPECT_DOUBLE_EQ(loha.at("transformer_blocks.0.attn1.to_q").scale(), 1.5 / 2);
  EXPECT_DOUBLE_EQ(loha.at("transformer_blocks.0.attn1.to_k").scale(), 3.0 / 3);
  EXPECT_EQ(loha.at("transformer_blocks.0.attn1.to_v").scale(), 1.0);      // no alpha: alpha = r
  EXPECT_EQ(loha.at("transformer_blocks.0.attn1.to_out.0").scale(), 1.0);  // alpha 0: alpha = r
}

// ---- a 3×3 Conv2d ----------------------------------------------------------------------------------

class ConvHolder : public nn::UnaryModule {
 public:
  ConvHolder() {
    const io::TensorFile f = io::read_safetensors(fixture("conv.safetensors"));
    nn::Conv2dOptions o;
    o.in_channels = 4, o.out_channels = 6, o.kernel_h = 3, o.kernel_w = 3, o.padding = 1;
    conv_ = register_module("conv", std::make_shared<nn::Conv2d>(o, default_generator(), F64));
    set_parameter_data("conv.weight", f.find("weight")->to(F64));
    set_parameter_data("conv.bias", f.find("bias")->to(F64));
  }
  Variable forward(const Variable& x) const override { return conv_->forward(x); }

 private:
  std::shared_ptr<nn::Conv2d> conv_;
};

TEST(Lycoris, ConvModulesMatchTheGoldens) {
  const io::TensorFile f = io::read_safetensors(fixture("conv.safetensors"));
  const Variable x(f.find("x")->to(F64));
  // conv_locon: kohya's LoCon (a plain LoRA on the 3×3 conv) read from a file; conv_dora_peft: PEFT's DoRA.
  for (const std::string name : {"conv_loha", "conv_lokr", "conv_lokr_full", "conv_locon", "conv_dora_peft"}) {
    SCOPED_TRACE(name);
    auto holder = std::make_shared<ConvHolder>();
    NoGradGuard no_grad;
    const Tensor base = holder->forward(x).tensor();
    EXPECT_LE(rel_error(base, f.find("base")->to(F64)), 1e-12);
    LoraSet set(holder);
    const io::AdapterLoadReport r = io::load_lora(set, "a", fixture(name + ".safetensors"));
    EXPECT_TRUE(r.clean()) << r.summary();
    EXPECT_EQ(r.kinds.size(), name == "conv_locon" ? 0u : 1u) << r.summary();
    const Tensor ref = f.find(name)->to(F64);
    const Tensor adapted = holder->forward(x).tensor();
    EXPECT_LE(rel_error(adapted, ref), 1e-10);
    set.fuse();
    EXPECT_LE(rel_error(holder->forward(x).tensor(), adapted), 1e-12);
    set.unfuse();
    set.set_weight("a", 0.0);
    EXPECT_EQ(holder->forward(x).tensor().to_vector(), base.to_vector());
  }
}

// ---- `loom run --adapter FILE:WEIGHT [--fuse]` ------------------------------------------------------

TEST(Lycoris, RunWithAWeightedAdapterFileAsTheCommandLineDoes) {
  trainer::DataSet data;
  data.hidden_states = inputs().find("hidden_states")->to(F32);
  data.encoder_hidden_states = inputs().find("encoder_hidden_states")->to(F32);
  for (bool fuse : {false, true}) {
    trainer::RunOptions o;
    o.model_dir = fixture("model");
    o.adapters = {trainer::AdapterSpec::parse(fixture("loha.safetensors") + ":0.5")};
    o.fuse = fuse;
    const trainer::RunResult r = trainer::run_model(o, data);
    EXPECT_LE(rel_error(r.output.to(F64), golden("loha_w05")), 1e-5) << "fuse " << fuse;
    ASSERT_EQ(r.reports.size(), 1u);
    EXPECT_THAT(r.reports[0].summary(), HasSubstr("LoHa modules"));
  }
}

// ---- conversion ---------------------------------------------------------------------------------------

Tensor output_with(const std::string& file) {
  auto m = model(F64);
  LoraSet set(m);
  io::load_lora(set, "a", file);
  return forward(*m, F64);
}

TEST(Lycoris, ConvertWritesKohyaNamesOrRefusesByName) {
  TempDir dir;
  for (const auto& [file, name] : cases()) {
    SCOPED_TRACE(file);
    const std::string out = dir / ("kohya_" + file);
    const io::ConvertReport r = io::convert_adapter_file(fixture(file), out, io::KeyFamily::Kohya);
    EXPECT_TRUE(r.skipped.empty()) << r.summary();
    EXPECT_LE(rel_error(output_with(out), golden(name)), 1e-10);
    // The families that cannot hold them refuse, naming the kind, and write nothing.
    for (io::KeyFamily family : {io::KeyFamily::Diffusers, io::KeyFamily::Loom}) {
      const std::string refused = dir / (std::string("refused_") + io::family_name(family) + file);
      EXPECT_THAT(error_of([&] { io::convert_adapter_file(fixture(file), refused, family); }),
                  ::testing::AnyOf(HasSubstr("LoHa"), HasSubstr("LoKr"), HasSubstr("DoRA")));
      EXPECT_FALSE(std::ifstream(refused).good());
    }
  }
  // PEFT holds PEFT's DoRA (lora_magnitude_vector), not LyCORIS' dora_scale nor LoHa / LoKr.
  const std::string peft = dir / "peft_dora.safetensors";
  io::convert_adapter_file(fixture("dora_peft.safetensors"), peft, io::KeyFamily::Peft);
  EXPECT_LE(rel_error(output_with(peft), golden("dora_peft")), 1e-10);
  EXPECT_THAT(error_of([&] { io::convert_adapter_file(fixture("dora_kohya.safetensors"), dir / "x", io::KeyFamily::Peft); }),
              HasSubstr("dora_scale"));
  EXPECT_THAT(error_of([&] { io::convert_adapter_file(fixture("loha.safetensors"), dir / "y", io::KeyFamily::Peft); }),
              HasSubstr("is a LoHa"));
}

TEST(Lycoris, ModelFreeReadingShowsKindsForInspect) {
  const io::RawLora raw = io::read_raw_lora(io::read_tensor_file(fixture("loha.safetensors")), "loha");
  ASSERT_EQ(raw.modules.size(), 11u);
  EXPECT_TRUE(raw.skipped.empty());
  const io::RawLoraModule& q = raw.modules.at("transformer_blocks.0.attn1.to_q");
  EXPECT_EQ(q.kind_text(), "LoHa");
  EXPECT_EQ(q.rank(), 2);
  EXPECT_DOUBLE_EQ(q.scale(), 0.75);
  const io::RawLora dora = io::read_raw_lora(io::read_tensor_file(fixture("dora_kohya.safetensors")), "dora");
  EXPECT_EQ(dora.modules.at("transformer_blocks.0.attn1.to_q").kind_text(), "LoRA+DoRA");
  EXPECT_EQ(dora.modules.at("transformer_blocks.0.attn2.to_k").kind_text(), "LoHa+DoRA");
}

// ---- malformed files ------------------------------------------------------------------------------------

// The fixture `file` with `edit` applied to its tensors, written to `dir`.
std::string edited(const TempDir& dir, const std::string& file,
                   const std::function<void(std::vector<std::pair<std::string, Tensor>>&)>& edit) {
  io::TensorFile f = io::read_safetensors(fixture(file));
  edit(f.tensors);
  const std::string out = dir / ("edited_" + file);
  io::write_safetensors(out, f.tensors, f.metadata);
  return out;
}

std::string load_error(const std::string& path) {
  return error_of([&] {
    auto m = model(F64);
    LoraSet set(m);
    io::load_lora(set, "a", path);
  });
}

void drop(std::vector<std::pair<std::string, Tensor>>& t, const std::string& key) {
  t.erase(std::remove_if(t.begin(), t.end(), [&](const auto& p) { return p.first == key; }), t.end());
}

void replace(std::vector<std::pair<std::string, Tensor>>& t, const std::string& key, const Tensor& value) {
  for (auto& [k, v] : t)
    if (k == key) v = value;
}

const std::string kQ = "lora_unet_transformer_blocks_0_attn1_to_q";

TEST(Lycoris, MalformedFilesAreErrorsNamingTheKeyAndShapes) {
  TempDir dir;
  // A missing LoHa factor.
  std::string e = load_error(edited(dir, "loha.safetensors", [](auto& t) { drop(t, kQ + ".hada_w2_b"); }));
  EXPECT_THAT(e, HasSubstr("hada_w2_b"));
  EXPECT_THAT(e, HasSubstr("lacks"));
  // A LoHa factor that does not fit the module.
  e = load_error(edited(dir, "loha.safetensors",
                        [](auto& t) { replace(t, kQ + ".hada_w1_b", Tensor::zeros({2, 7}, F64)); }));
  EXPECT_THAT(e, HasSubstr(kQ + ".hada_w1_b"));
  EXPECT_THAT(e, HasSubstr("[2, 7]"));
  // A LoKr whose w1 does not divide the weight.
  e = load_error(edited(dir, "lokr_full.safetensors",
                        [](auto& t) { replace(t, kQ + ".lokr_w1", Tensor::zeros({3, 2}, F64)); }));
  EXPECT_THAT(e, HasSubstr(kQ + ".lokr_w1"));
  EXPECT_THAT(e, HasSubstr("[3, 2]"));
  // A missing half of a factored LoKr.
  e = load_error(edited(dir, "lokr_factored.safetensors", [](auto& t) { drop(t, kQ + ".lokr_w2_a"); }));
  EXPECT_THAT(e, HasSubstr("lokr_w2_a"));
  // LyCORIS' Tucker form is refused by name.
  e = load_error(edited(dir, "loha.safetensors",
                        [](auto& t) { t.emplace_back(kQ + ".hada_t1", Tensor::zeros({2, 2, 1, 1}, F64)); }));
  EXPECT_THAT(e, HasSubstr("Tucker"));
  EXPECT_THAT(e, HasSubstr(kQ + ".hada_t1"));
  // LoRA and LoHa keys on one module.
  e = load_error(edited(dir, "loha.safetensors", [](auto& t) {
    t.emplace_back(kQ + ".lora_down.weight", Tensor::zeros({2, 8}, F64));
    t.emplace_back(kQ + ".lora_up.weight", Tensor::zeros({8, 2}, F64));
  }));
  EXPECT_THAT(e, HasSubstr("mixes"));
  // A DoRA magnitude of the wrong shape, and one without weights beside it.
  e = load_error(edited(dir, "dora_kohya.safetensors",
                        [](auto& t) { replace(t, kQ + ".dora_scale", Tensor::ones({1, 5}, F32)); }));
  EXPECT_THAT(e, HasSubstr(kQ + ".dora_scale"));
  EXPECT_THAT(e, HasSubstr("[1, 5]"));
  e = load_error(edited(dir, "dora_peft.safetensors", [](auto& t) {
    drop(t, "transformer_blocks.0.attn1.to_q.lora_A.weight");
    drop(t, "transformer_blocks.0.attn1.to_q.lora_B.weight");
  }));
  EXPECT_THAT(e, HasSubstr("transformer_blocks.0.attn1.to_q.lora_magnitude_vector"));
}

// ---- f64 gradient checks -----------------------------------------------------------------------------------

class LinearHolder : public nn::UnaryModule {
 public:
  explicit LinearHolder(Generator& gen) {
    proj_ = register_module("proj", std::make_shared<nn::Linear>(6, 4, true, gen, F64));
  }
  Variable forward(const Variable& x) const override { return proj_->forward(x); }

 private:
  std::shared_ptr<nn::Linear> proj_;
};

Variable rand_param(const Shape& s, Generator& gen) { return Variable(Tensor::randn(s, gen, F64, Device::cpu(), 0.0, 0.5)); }

void expect_gradcheck(const std::shared_ptr<nn::UnaryModule>& m, std::vector<Variable> inputs) {
  const GradcheckResult r = gradcheck([&](const std::vector<Variable>& in) { return m->forward(in[0]); }, inputs);
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_GT(r.entries_checked, 0);
}

TEST(LycorisGradcheck, LohaLokrAndDoraMagnitude) {
  Generator gen(91);
  const Variable x(Tensor::randn({3, 6}, gen, F64), true);
  struct Case {
    std::string name;
    LoraModule module;
    bool factors_exact;  // DoRA's norm is a constant for autograd (PEFT): only m and x are checked then
  };
  std::vector<Case> all;
  LoraModule loha;
  loha.kind = ModuleKind::LoHa;
  loha.alpha = 1.5;
  loha.factors = {{"hada_w1_a", rand_param({4, 2}, gen)}, {"hada_w1_b", rand_param({2, 6}, gen)},
                  {"hada_w2_a", rand_param({4, 2}, gen)}, {"hada_w2_b", rand_param({2, 6}, gen)}};
  all.push_back({"LoHa", loha, true});
  LoraModule lokr;
  lokr.kind = ModuleKind::LoKr;
  lokr.alpha = 3.0;
  lokr.factors = {{"lokr_w1", rand_param({2, 2}, gen)}, {"lokr_w2_a", rand_param({2, 1}, gen)},
                  {"lokr_w2_b", rand_param({1, 3}, gen)}};
  all.push_back({"LoKr", lokr, true});
  LoraModule dora;
  dora.down = rand_param({2, 6}, gen), dora.up = rand_param({4, 2}, gen), dora.alpha = 2.0;
  dora.magnitude = Variable(Tensor::rand({4}, gen, F64, Device::cpu(), 0.5, 1.5));
  all.push_back({"LoRA+DoRA", dora, false});
  LoraModule dora_in = loha;
  dora_in.magnitude = Variable(Tensor::rand({1, 6}, gen, F64, Device::cpu(), 0.5, 1.5));
  dora_in.dora_norm = adapters::DoraNorm::PerInput;
  dora_in.magnitude_name = "dora_scale";
  all.push_back({"LoHa+DoRA per input", dora_in, false});
  for (const Case& c : all) {
    SCOPED_TRACE(c.name);
    auto holder = std::make_shared<LinearHolder>(gen);
    LoraSet set(holder);
    auto& a = set.add_from_weights("a", {{"proj", c.module}});
    set.set_weight("a", 0.7);
    std::vector<Variable> in;
    in.reserve(8);
    in.push_back(x);
    if (c.factors_exact)
      for (const auto& [name, v] : a.named_parameters()) in.push_back(v);
    else
      in.push_back(a.module("proj").magnitude);
    EXPECT_GT(in.size(), 1u);
    expect_gradcheck(holder, in);
  }
}

class SmallConv : public nn::UnaryModule {
 public:
  explicit SmallConv(Generator& gen) {
    nn::Conv2dOptions o;
    o.in_channels = 2, o.out_channels = 4, o.kernel_h = 3, o.kernel_w = 3, o.padding = 1;
    conv_ = register_module("conv", std::make_shared<nn::Conv2d>(o, gen, F64));
  }
  Variable forward(const Variable& x) const override { return conv_->forward(x); }

 private:
  std::shared_ptr<nn::Conv2d> conv_;
};

TEST(LycorisGradcheck, ConvLokrAndLohaFactors) {
  Generator gen(92);
  const Variable x(Tensor::randn({1, 2, 3, 3}, gen, F64), true);
  LoraModule lokr;  // out 4 = 2·2, in 2 = 1·2, w2 factored over (b2·3·3)
  lokr.kind = ModuleKind::LoKr;
  lokr.alpha = 2.0;
  lokr.factors = {{"lokr_w1", rand_param({2, 1}, gen)}, {"lokr_w2_a", rand_param({2, 1}, gen)},
                  {"lokr_w2_b", rand_param({1, 18}, gen)}};
  LoraModule loha;  // hada_w1_b in LyCORIS' 4-D spelling (r, in, kh, kw)
  loha.kind = ModuleKind::LoHa;
  loha.factors = {{"hada_w1_a", rand_param({4, 1}, gen)}, {"hada_w1_b", rand_param({1, 2, 3, 3}, gen)},
                  {"hada_w2_a", rand_param({4, 1}, gen)}, {"hada_w2_b", rand_param({1, 18}, gen)}};
  for (const LoraModule& module : {lokr, loha}) {
    SCOPED_TRACE(adapters::module_kind_name(module.kind));
    auto holder = std::make_shared<SmallConv>(gen);
    LoraSet set(holder);
    auto& a = set.add_from_weights("a", {{"conv", module}});
    std::vector<Variable> in;
    in.reserve(8);
    in.push_back(x);
    for (const auto& [name, v] : a.named_parameters()) in.push_back(v);
    expect_gradcheck(holder, in);
  }
}

}  // namespace
}  // namespace loom
