#include "trainer/builtin_unet.h"

#include <cmath>
#include <iomanip>
#include <map>
#include <ostream>

#include "adapters/lora.h"
#include "io/adapter_io.h"
#include "tensor/ops.h"
#include "trainer/builtin_common.h"
#include "trainer/diffusion_objective.h"
#include "unet/unet_io.h"

namespace loom::trainer {

namespace {

using builtin::squared_norm;

constexpr int64_t kSamples = 4, kSide = 8, kTokens = 6;
constexpr int64_t kFirstTimestep = 50, kLastTimestep = 650;
constexpr double kContextScale = 4.0;

const char* const kConfigJson = R"({
  "_class_name": "UNet2DConditionModel",
  "sample_size": 8,
  "in_channels": 4,
  "out_channels": 4,
  "block_out_channels": [16, 32],
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
  "layers_per_block": 1,
  "attention_head_dim": 2,
  "cross_attention_dim": 16,
  "norm_num_groups": 8,
  "flip_sin_to_cos": true,
  "freq_shift": 0
}
)";

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// The projections the teacher changes: every attn2's to_v (LoRA: its input is the random context,
// which spans its space, so the change is identifiable from the outputs), or attn2's to_k and to_v
// (what Custom Diffusion trains).
std::vector<std::string> changed_modules(const unet::UNet2DConditionModel& m, bool lora) {
  std::vector<std::string> paths;
  for (const auto& [name, p] : m.named_parameters()) {
    const std::string path = name.substr(0, name.size() - std::string(".weight").size());
    if (lora ? ends_with(name, ".attn2.to_v.weight")
             : (ends_with(name, ".attn2.to_k.weight") || ends_with(name, ".attn2.to_v.weight")))
      paths.push_back(path);
  }
  return paths;
}

// The UNet's prediction for the inputs of `data` at its noisy latents `noisy`, f32 on the CPU.
Tensor predict(const unet::UNet2DConditionModel& model, const DiffusionData& data, const Tensor& noisy,
               const Placement& where) {
  NoGradGuard ng;
  const DType act = storage_dtype(where.precision);
  unet::UNetInputs in;
  in.sample = Variable(noisy.to(where.device).to(act));
  in.timestep = data.timesteps;
  in.encoder_hidden_states = Variable(data.encoder_hidden_states.to(where.device).to(act));
  return model.forward(in).tensor().to(DType::F32).to(Device::cpu());
}

// The data of the header's design: x_t, t and c random, noise = the teacher's ε̂, latents such that
// add_noise(latents, ε̂, t) = x_t. Returns x_t.
Tensor make_data(const unet::UNet2DConditionModel& teacher, DiffusionData& data, Generator& gen) {
  const int64_t cad = teacher.config().cross_attention_dim.front();
  const Tensor noisy = Tensor::randn({kSamples, teacher.config().in_channels, kSide, kSide}, gen);
  std::vector<double> t(static_cast<size_t>(kSamples));
  for (double& v : t) v = double(kFirstTimestep + int64_t(gen.uniform() * double(kLastTimestep - kFirstTimestep + 1)));
  data.timesteps = Tensor::from_values(t, {kSamples}, DType::F64);
  // Context ×kContextScale: sharper cross-attention, so that each sample shows to_v several
  // directions of the context rather than about its mean (which is all a uniform softmax passes).
  data.encoder_hidden_states = ops::mul_scalar(Tensor::randn({kSamples, kTokens, cad}, gen), kContextScale);
  data.noise = predict(teacher, data, noisy, placement_of("cpu", "f32"));
  const unet::DDPMSchedule schedule;  // Stable Diffusion's (the run's defaults)
  std::vector<double> a, s;
  for (double ti : t) {
    const double abar = schedule.alphas_cumprod()[size_t(ti)];
    a.push_back(1.0 / std::sqrt(abar)), s.push_back(std::sqrt(1.0 - abar));
  }
  const Tensor inv_alpha = Tensor::from_values(a, {kSamples, 1, 1, 1}, DType::F64);
  const Tensor sigma = Tensor::from_values(s, {kSamples, 1, 1, 1}, DType::F64);
  data.latents = ops::mul(ops::sub(noisy.to(DType::F64), ops::mul(sigma, data.noise.to(DType::F64))), inv_alpha)
                     .to(DType::F32);
  return noisy;
}

void write_files(const unet::UNet2DConditionModel& base, const DiffusionData& data, const BuiltinReport& r) {
  std::vector<std::pair<std::string, Tensor>> weights;
  for (const auto& [k, v] : base.state_dict()) weights.emplace_back(k, v);
  make_dirs(r.model_dir);
  io::write_file_atomic(r.model_dir + "/config.json", kConfigJson);
  io::write_safetensors(r.model_dir + "/diffusion_pytorch_model.safetensors", weights);
  io::write_safetensors(r.data_path, {{"latents", data.latents},
                                      {"noise", data.noise},
                                      {"timesteps", data.timesteps},
                                      {"encoder_hidden_states", data.encoder_hidden_states}});
}

// The base model directory loaded again with the saved adapter (what a user does next).
Tensor reloaded_prediction(const BuiltinReport& r, bool lora, const DiffusionData& data, const Tensor& noisy,
                           const Placement& where) {
  auto model = unet::load_unet_dir(r.model_dir).model;
  model->eval();
  place_model(*model, where);
  std::unique_ptr<adapters::LoraSet> set;
  if (lora) {
    set = std::make_unique<adapters::LoraSet>(model);
    io::load_lora(*set, "reloaded", r.adapter_path);
  } else {
    io::load_custom_diffusion(*model, r.adapter_path);
  }
  return predict(*model, data, noisy, where);
}

}  // namespace

BuiltinReport run_builtin_unet_task(const BuiltinOptions& opt, std::ostream& out, std::ostream& log) {
  const bool lora = opt.adapter == "lora";
  BuiltinReport report = builtin::start_report(opt);
  const std::string dir = opt.out_dir;

  const unet::UNet2DConditionConfig config = unet::UNet2DConditionConfig::from_json_text(kConfigJson, "built-in");
  Generator base_gen(opt.seed), teacher_gen(opt.seed), change_gen(opt.seed + 101), data_gen(opt.seed + 202);
  auto base = std::make_shared<unet::UNet2DConditionModel>(config, base_gen);
  unet::UNet2DConditionModel teacher(config, teacher_gen);
  const std::map<std::string, Tensor> deltas =
      builtin::add_hidden_changes(teacher, changed_modules(teacher, lora), lora, change_gen);
  base->eval(), teacher.eval();
  DiffusionData data;
  const Tensor noisy = make_data(teacher, data, data_gen);

  TrainOptions t = builtin::train_options(opt, kSamples);
  t.diffusion.enabled = true;
  const Placement where = placement_of(opt.device, opt.precision);
  t.targets = {"attn2.to_v"};  // the LoRA adapts the projections the teacher changed
  t.steps = opt.steps > 0 ? opt.steps : 200;
  t.max_grad_norm = 1.0;
  t.validate();  // before any file is written
  write_files(*base, data, report);
  out << "loom built-in UNet task: " << (lora ? "LoRA" : "Custom Diffusion") << " on a UNet2DConditionModel (blocks "
      << config.block_out_channels[0] << "/" << config.block_out_channels[1] << " channels, " << kSide << "x" << kSide
      << " latents, context " << kTokens << "x" << config.cross_attention_dim.front()
      << "), epsilon diffusion loss against a teacher with a hidden change on " << deltas.size() << " projections, "
      << t.steps << " steps\n";

  const TrainResult r = train_unet(base, data, t, log);
  report.adapter_path = r.adapter_path;
  report.start_loss = r.losses.front();
  report.final_loss = r.losses.back();
  report.recovered = builtin::recovered_share(*base, r, deltas);
  const Tensor trained = predict(*base, data, noisy, where);
  const Tensor reloaded = reloaded_prediction(report, lora, data, noisy, where);
  report.reload_error = std::sqrt(squared_norm(ops::sub(reloaded, trained)) / squared_norm(trained));
  builtin::finish_report(report, r, where, builtin::thresholds(where, 0.02), dir, out);
  return report;
}

}  // namespace loom::trainer
