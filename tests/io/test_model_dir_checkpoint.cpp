// Model directories (config.json + weights, a block of a full UNet file) and training checkpoints that resume exactly.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "adapters/lora.h"
#include "autograd/ops.h"
#include "io/adapter_io.h"
#include "io/checkpoint.h"
#include "optim/optim.h"
#include "tests/test_helpers.h"

namespace loom::io {
namespace {

using ::testing::HasSubstr;
using loom::testing::error_of;
using loom::testing::rel_error;
using loom::testing::TempDir;
using loom::testing::adapter_io::Inputs;
using loom::testing::adapter_io::run;
using loom::testing::adapter_io::tiny_inputs;
using loom::testing::adapter_io::tiny_model;
using loom::testing::adapter_io::trained_like;

// ---- model directories --------------------------------------------------------------------------

TEST(ModelDir, LoadsConfigAndWeightsAndABlockOfAFullUnetFile) {
  TempDir dir;
  const Inputs in = tiny_inputs(DType::F32);
  auto model = tiny_model();
  {
    std::ofstream cfg(dir.file("config.json"));
    cfg << R"({"_class_name": "Transformer2DModel", "in_channels": 4, "num_attention_heads": 2,
              "attention_head_dim": 3, "num_layers": 2, "cross_attention_dim": 5, "norm_num_groups": 2})";
  }
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& [k, t] : model->state_dict()) tensors.emplace_back("mid_block.attentions.0." + k, t);
  tensors.emplace_back("conv_in.weight", Tensor::zeros({3}));
  write_safetensors(dir.file("diffusion_pytorch_model.safetensors"), tensors);
  const auto loaded = load_model_dir(dir.file(""), "mid_block.attentions.0");
  EXPECT_EQ(run(*loaded, in).to_vector(), run(*model, in).to_vector());
  EXPECT_THAT(error_of([&] { load_model_dir(dir.file("")); }), HasSubstr("diffusion_pytorch_model.safetensors"));
  EXPECT_THAT(error_of([&] { load_model_dir(dir.file("nowhere")); }), HasSubstr("config.json"));
}

// A directory holding one block with bare keys (save_pretrained of a Transformer2DModel) and a LoRA
// for the whole UNet: --prefix then selects the adapter's keys only.
TEST(ModelDir, ABareBlockWithAPrefixSelectsOnlyTheAdaptersKeys) {
  TempDir dir;
  const Inputs in = tiny_inputs(DType::F32);
  auto model = tiny_model();
  {
    std::ofstream cfg(dir.file("config.json"));
    cfg << R"({"_class_name": "Transformer2DModel", "in_channels": 4, "num_attention_heads": 2,
              "attention_head_dim": 3, "num_layers": 2, "cross_attention_dim": 5, "norm_num_groups": 2})";
  }
  std::vector<std::pair<std::string, Tensor>> bare;
  for (const auto& [k, t] : model->state_dict()) bare.emplace_back(k, t);
  write_safetensors(dir.file("diffusion_pytorch_model.safetensors"), bare);
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 61);
  const Tensor want = run(*model, in);
  auto unet_lora = lora_tensors(a, *model, KeyFamily::Kohya, "down_blocks.1.attentions.0", nullptr);
  const auto other = lora_tensors(a, *model, KeyFamily::Kohya, "up_blocks.1.attentions.2", nullptr);
  unet_lora.insert(unet_lora.end(), other.begin(), other.end());
  write_safetensors(dir.file("unet_lora.safetensors"), unet_lora);

  const std::string prefix = "down_blocks.1.attentions.0";
  const auto loaded = load_model_dir(dir.file(""), prefix);
  adapters::LoraSet s(loaded);
  AdapterLoadOptions o;
  o.prefix = prefix;
  const AdapterLoadReport r = load_lora(s, "u", dir.file("unet_lora.safetensors"), o);
  EXPECT_EQ(r.outside_prefix.size(), other.size()) << r.summary();
  EXPECT_LE(rel_error(run(*loaded, in), want), 1e-6);
  // Without a prefix the bare block loads as before; a file of neither kind is a named error.
  EXPECT_NO_THROW(load_model_dir(dir.file("")));
  write_safetensors(dir.file("diffusion_pytorch_model.safetensors"), {{"conv_in.weight", Tensor::zeros({2})}});
  EXPECT_THAT(error_of([&] { load_model_dir(dir.file(""), prefix); }), HasSubstr("no key under the prefix"));
}

// ---- checkpoints ---------------------------------------------------------------------------------

// N steps of Adam on a LoRA, with batches drawn from `gen`; from a checkpoint when given.
struct TrainingRun {
  std::shared_ptr<attention::Transformer2DModel> model = tiny_model(DType::F32);
  std::unique_ptr<adapters::LoraSet> set = std::make_unique<adapters::LoraSet>(model);
  std::unique_ptr<optim::Optimizer> opt;
  Generator gen{1234};
  int64_t step = 0;

  TrainingRun() {
    adapters::LoraConfig cfg;
    cfg.rank = 2, cfg.alpha = 2.0;
    Generator init(7);
    set->add("default", cfg, init);
    opt = optim::make_optimizer("adamw", set->trainable_parameters(), 1e-2);
  }
  void train(int64_t steps) {
    Generator data(42);
    const Tensor xs = Tensor::randn({6, 4, 3, 3}, data), ctx = Tensor::randn({6, 4, 5}, data);
    const Tensor target = Tensor::randn({6, 4, 3, 3}, data);
    for (int64_t i = 0; i < steps; ++i, ++step) {
      const int64_t b = int64_t(gen.uniform() * 5);  // a random batch of 2 from the stream
      opt->zero_grad();
      const Variable y = model->forward(Variable(xs.narrow(0, b, 2)), Variable(ctx.narrow(0, b, 2)));
      loom::mse_loss(y, Variable(target.narrow(0, b, 2))).backward();
      opt->step();
    }
  }
  Checkpoint checkpoint() const {
    Checkpoint c;
    c.adapter_kind = "lora";
    for (const auto& [n, v] : set->trainable_parameters()) c.adapter.emplace_back(n, v.tensor());
    c.optimizer = opt->state_dict();
    c.step = step;
    c.rng_state = gen.state();
    c.options_json = R"({"optimizer": "adamw", "lr": 0.01})";
    return c;
  }
  void restore(const Checkpoint& c) {
    const auto params = set->trainable_parameters();
    ASSERT_EQ(c.adapter.size(), params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      ASSERT_EQ(c.adapter[i].first, params[i].first);
      params[i].second.tensor().copy_(c.adapter[i].second);
    }
    opt->load_state_dict(c.optimizer);
    gen.set_state(c.rng_state);
    step = c.step;
  }
  std::vector<double> weights() const {
    std::vector<double> all;
    for (const auto& [n, v] : set->trainable_parameters()) {
      const auto w = v.tensor().to_vector();
      all.insert(all.end(), w.begin(), w.end());
    }
    return all;
  }
};

TEST(Checkpoint, ResumingGivesTheUninterruptedRunBitForBit) {
  TempDir dir;
  TrainingRun straight;
  straight.train(7);
  TrainingRun first;
  first.train(3);
  save_checkpoint(dir.file("ckpt.h5"), first.checkpoint());
  TrainingRun resumed;
  resumed.restore(load_checkpoint(dir.file("ckpt.h5")));
  EXPECT_EQ(resumed.step, 3);
  resumed.train(4);
  EXPECT_EQ(resumed.weights(), straight.weights());
  EXPECT_NE(first.weights(), straight.weights());
}

TEST(Checkpoint, AForeignFileIsRefused) {
  TempDir dir;
  write_hdf5(dir.file("x.h5"), {{"a", Tensor::zeros({2})}}, {{"format", std::string("loom")}, {"kind", std::string("lora")}});
  EXPECT_THAT(error_of([&] { load_checkpoint(dir.file("x.h5")); }), HasSubstr("not a loom checkpoint"));
}

}  // namespace
}  // namespace loom::io
