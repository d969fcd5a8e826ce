// LoRA on Conv2d (kohya's LoCon, PEFT's Conv2d LoRA) through adapters/lora's choke
// point: PEFT's numbers on the sd1 fixture UNet (tests/unet/fixtures/sd1/locon_peft.safetensors,
// made by make_locon_fixture.py), fuse/unfuse, zero-init identity, f64 gradcheck (ctest -L unet).
#include <gtest/gtest.h>

#include <cmath>

#include "adapters/lora.h"
#include "autograd/gradcheck.h"
#include "io/tensor_file.h"
#include "unet/unet_io.h"

namespace loom::unet {
namespace {

constexpr DType F64 = DType::F64;

double rel_error(const Tensor& a, const Tensor& b) {
  const auto x = a.to(F64).to_vector(), y = b.to(F64).to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    num = std::max(num, std::abs(x[i] - y[i]));
    den = std::max(den, std::abs(y[i]));
  }
  return num / (den > 0 ? den : 1);
}

struct Sd1 {
  std::shared_ptr<UNet2DConditionModel> model;
  io::TensorFile golden;
  Tensor forward() const {
    NoGradGuard ng;
    UNetInputs in;
    in.sample = Variable(golden.find("sample")->to(F64));
    in.timestep = *golden.find("timestep");
    in.encoder_hidden_states = Variable(golden.find("encoder_hidden_states")->to(F64));
    return model->forward(in).tensor();
  }
};

Sd1 load_sd1() {
  const std::string dir = std::string(LOOM_UNET_FIXTURE_DIR) + "/sd1";
  UNetLoadOptions o;
  o.dtype = F64;
  return Sd1{load_unet_dir(dir, o).model, io::read_safetensors(dir + "/golden.safetensors")};
}

TEST(LoCon, MatchesPeftOnTheUNetAndFusesExactly) {
  const Sd1 u = load_sd1();
  const io::TensorFile f = io::read_safetensors(std::string(LOOM_UNET_FIXTURE_DIR) + "/sd1/locon_peft.safetensors");
  std::map<std::string, adapters::LoraModule> modules;
  const std::string a_suffix = ".lora_A.weight";
  int convs = 0;
  for (const auto& [key, t] : f.tensors) {
    if (key.size() <= a_suffix.size() || key.compare(key.size() - a_suffix.size(), a_suffix.size(), a_suffix) != 0)
      continue;
    const std::string path = key.substr(0, key.size() - a_suffix.size());
    adapters::LoraModule m;
    m.down = Variable(t);
    m.up = Variable(*f.find(path + ".lora_B.weight"));
    m.alpha = 3.0;
    convs += t.dim() == 4;
    modules[path] = m;
  }
  ASSERT_GT(convs, 10);
  const Tensor base = u.forward();
  adapters::LoraSet set(u.model);
  set.add_from_weights("locon", modules);
  const Tensor ref = f.find("lora_output_f64")->to(F64);
  EXPECT_LE(rel_error(u.forward(), ref), 1e-10);
  const Tensor w_before = u.model->find_parameter("down_blocks.0.downsamplers.0.conv.weight").tensor().clone();
  set.fuse();
  EXPECT_LE(rel_error(u.forward(), ref), 1e-10);
  set.unfuse();
  EXPECT_EQ(u.model->find_parameter("down_blocks.0.downsamplers.0.conv.weight").tensor().to_vector(),
            w_before.to_vector());
  set.set_weight("locon", 0.0);
  EXPECT_EQ(u.forward().to_vector(), base.to_vector());  // weight 0: the base output bit for bit
}

TEST(LoCon, NewAdapterOnConvsStartsAsTheIdentityAndTrainsOnlyItself) {
  const Sd1 u = load_sd1();
  const Tensor base = u.forward();
  adapters::LoraSet set(u.model);
  adapters::LoraConfig c;
  c.rank = 3;
  c.targets = {"conv1", "conv2"};
  Generator gen(4);
  auto& a = set.add("new", c, gen);
  ASSERT_TRUE(a.modules().count("down_blocks.0.resnets.0.conv1"));
  EXPECT_EQ(a.modules().at("down_blocks.0.resnets.0.conv1").down.shape(), Shape({3, 8, 3, 3}));
  EXPECT_EQ(a.modules().at("down_blocks.0.resnets.0.conv1").up.shape(), Shape({8, 3, 1, 1}));
  EXPECT_EQ(u.forward().to_vector(), base.to_vector());
  EXPECT_FALSE(u.model->find_parameter("conv_in.weight").requires_grad());
}

TEST(LoCon, GradcheckOfAStridedConvWithTwoAdapters) {
  Generator gen(5);
  auto holder = std::make_shared<nn::ModuleList>();
  auto conv = holder->push_back(std::make_shared<nn::Conv2d>(3, 4, 3, 2, 1, true, gen, F64));  // path "0"
  adapters::LoraSet set(holder);
  auto module = [&](int64_t r, double alpha) {
    adapters::LoraModule m;
    m.down = Variable(Tensor::randn({r, 3, 3, 3}, gen, F64));
    m.up = Variable(Tensor::randn({4, r, 1, 1}, gen, F64));
    m.alpha = alpha;
    return m;
  };
  set.add_from_weights("a", {{"0", module(2, 1.0)}});
  set.add_from_weights("b", {{"0", module(1, 4.0)}});
  set.set_weight("b", 0.5);
  const Variable x(Tensor::randn({2, 3, 5, 4}, gen, F64), true);
  const auto& ma = set.adapter("a").module("0");
  const auto& mb = set.adapter("b").module("0");
  const GradcheckResult r = gradcheck([&](const std::vector<Variable>& v) { return conv->forward(v[0]); },
                                      {x, ma.down, ma.up, mb.down, mb.up});
  EXPECT_TRUE(r.ok) << r.message;
  adapters::LoraModule bad = module(2, 1.0);
  bad.up = Variable(Tensor::randn({4, 2}, gen, F64));  // a Linear-shaped B on a Conv2d
  EXPECT_THROW(set.add_from_weights("bad", {{"0", bad}}), Error);
}

}  // namespace
}  // namespace loom::unet
