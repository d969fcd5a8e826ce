// One training step of the diffusion objective against diffusers + PEFT (SPEC §8), in f64:
// the loss and every LoRA gradient of train_text_to_image_lora(_sdxl).py's step on the sd1 and
// sdxl fixture UNets with a PEFT LoRA (r 2, alpha 3 on to_q / to_k / to_v / to_out.0), given
// latents, noise and timesteps: epsilon, epsilon with min-SNR-γ 5, v-prediction with min-SNR-γ 5
// (tests/unet/fixtures/make_training_fixtures.py; ctest -L unet).
#include <gtest/gtest.h>

#include <optional>

#include "adapters/lora.h"
#include "io/tensor_file.h"
#include "tests/test_helpers.h"
#include "trainer/diffusion_objective.h"
#include "unet/unet_io.h"

namespace loom::trainer {
namespace {

constexpr DType F64 = DType::F64;
using loom::testing::rel_error;

struct Case {
  const char* name;
  const char* prediction_type;
  std::optional<double> snr_gamma;
};
const Case kCases[] = {{"eps", "epsilon", std::nullopt}, {"eps_snr", "epsilon", 5.0}, {"v_snr", "v_prediction", 5.0}};

// The fixture LoRA (PEFT keys <module>.lora_A.weight / .lora_B.weight) as LoRA modules.
std::map<std::string, adapters::LoraModule> fixture_lora(const io::TensorFile& f) {
  std::map<std::string, adapters::LoraModule> modules;
  const std::string a_suffix = ".lora_A.weight";
  for (const auto& [key, t] : f.tensors) {
    if (key.size() <= a_suffix.size() || key.compare(key.size() - a_suffix.size(), a_suffix.size(), a_suffix) != 0)
      continue;
    const std::string path = key.substr(0, key.size() - a_suffix.size());
    adapters::LoraModule m;
    m.down = Variable(t.to(F64));
    m.up = Variable(f.find(path + ".lora_B.weight")->to(F64));
    m.rank = t.size(0);
    m.alpha = 3.0;
    modules[path] = m;
  }
  return modules;
}

Tensor maybe(const io::TensorFile& f, const std::string& key) {
  const Tensor* t = f.find(key);
  return t ? t->to(F64) : Tensor();
}

void check_training_step(const std::string& name, size_t min_modules) {
  const std::string dir = std::string(LOOM_UNET_FIXTURE_DIR) + "/" + name;
  unet::UNetLoadOptions lo;
  lo.dtype = F64;
  auto model = unet::load_unet_dir(dir, lo).model;
  model->train();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& lora = set.add_from_weights("default", fixture_lora(io::read_safetensors(dir + "/train_lora.safetensors")));
  ASSERT_GE(lora.modules().size(), min_modules);
  const io::TensorFile g = io::read_safetensors(dir + "/train_step.safetensors");
  DiffusionBatch b;
  b.latents = maybe(g, "latents"), b.noise = maybe(g, "noise"), b.timesteps = maybe(g, "timesteps");
  b.encoder_hidden_states = maybe(g, "encoder_hidden_states");
  b.text_embeds = maybe(g, "text_embeds"), b.time_ids = maybe(g, "time_ids");
  for (const Case& c : kCases) {
    SCOPED_TRACE(name + " " + c.name);
    unet::NoiseScheduleConfig sc;
    sc.prediction_type = c.prediction_type;
    const unet::DDPMSchedule schedule(sc);
    for (const auto& [n, p] : lora.named_parameters()) p.zero_grad();
    Variable loss = diffusion_loss(*model, schedule, b, c.snr_gamma, F64);
    loss.backward();
    const double want = g.find(std::string(c.name) + ".loss")->to(F64).item();
    EXPECT_LE(std::abs(loss.tensor().item() - want), 1e-10 * std::abs(want)) << loss.tensor().item() << " vs " << want;
    for (const auto& [path, m] : lora.modules()) {
      for (const auto& [suffix, v] : {std::pair{".lora_A.weight", m.down}, std::pair{".lora_B.weight", m.up}}) {
        const Tensor* ref = g.find(std::string(c.name) + ".grad." + path + suffix);
        ASSERT_NE(ref, nullptr) << path << suffix;
        ASSERT_TRUE(v.grad().defined()) << path << suffix;
        EXPECT_LE(rel_error(v.grad(), ref->to(F64)), 1e-10) << path << suffix;
      }
    }
  }
}

TEST(UNetTrainingStep, Sd1LossAndLoraGradientsMatchDiffusers) { check_training_step("sd1", 8); }
TEST(UNetTrainingStep, SdxlLossAndLoraGradientsMatchDiffusers) { check_training_step("sdxl", 8); }

}  // namespace
}  // namespace loom::trainer
