#include "trainer/builtin_unet.h"

#include <cmath>
#include <iomanip>
#include <map>
#include <ostream>

#include "adapters/lora.h"
#include "io/adapter_io.h"
#include "tensor/ops.h"
#include "trainer/diffusion_objective.h"
#include "unet/unet_io.h"

namespace loom::trainer {

namespace {

constexpr int64_t kSamples = 4, kSide = 8, kTokens = 6;
constexpr int64_t kHiddenRank = 4;
constexpr double kChangeScale = 0.5;  // ‖ΔW‖ / ‖W‖
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

double squared_norm(const Tensor& t) { return ops::sum(ops::square(t.to(DType::F64))).item(); }

Tensor hidden_change(const Tensor& w, bool low_rank, Generator& gen) {
  const int64_t out = w.size(0), in = w.size(1);
  Tensor delta = low_rank ? ops::matmul(Tensor::randn({out, kHiddenRank}, gen), Tensor::randn({kHiddenRank, in}, gen))
                          : Tensor::randn({out, in}, gen);
  return ops::mul_scalar(delta, kChangeScale * std::sqrt(squared_norm(w) / squared_norm(delta)));
}

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

// 1 − ‖learned − hidden‖² / ‖hidden‖² over the adapted weights (those the teacher left alone
// count with a hidden change of zero).
double recovered_share(const unet::UNet2DConditionModel& base, const TrainResult& r,
                       std::map<std::string, Tensor> deltas) {
  if (r.lora)
    for (const auto& [path, m] : r.lora->adapter("default").modules())
      if (!deltas.count(path)) deltas[path] = Tensor::zeros({m.up.size(0), m.down.size(1)}, DType::F64);
  double err = 0, total = 0;
  for (const auto& [path, delta] : deltas) {
    Tensor learned;
    if (r.lora) {
      const adapters::LoraModule& m = r.lora->adapter("default").modules().at(path);
      learned = ops::mul_scalar(ops::matmul(m.up.tensor().to(DType::F64), m.down.tensor().to(DType::F64)), m.scale());
    } else {
      const std::string layer = path.substr(0, path.rfind('.')), proj = path.substr(path.rfind('.') + 1);
      const Tensor w_cd = base.find_parameter(layer + ".processor." + proj + "_custom_diffusion.weight").tensor();
      learned = ops::sub(w_cd.to(DType::F64), base.find_parameter(path + ".weight").tensor().to(DType::F64));
    }
    total += squared_norm(delta);
    err += squared_norm(ops::sub(learned.to(Device::cpu()), delta.to(DType::F64)));
  }
  return 1.0 - err / total;
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

void print_report(const BuiltinReport& r, const TrainResult& t, const Placement& where, double loss_target,
                  double reload_tol, const std::string& dir, std::ostream& out) {
  out << std::scientific << std::setprecision(3);
  out << "  start loss      " << r.start_loss << "\n";
  out << "  final loss      " << r.final_loss << "  (" << std::fixed << std::setprecision(2)
      << 100.0 * r.final_loss / r.start_loss << "% of start; target ≤ " << 100 * loss_target
      << "%: " << (r.final_loss <= loss_target * r.start_loss ? "met" : "MISSED") << ")\n";
  out << "  recovered       " << std::setprecision(1) << 100.0 * r.recovered
      << "% of the hidden change (1 − ‖learned − hidden‖² / ‖hidden‖²)\n";
  out << "  reload check    " << std::scientific << std::setprecision(2) << r.reload_error
      << " relative error, saved adapter loaded again on " << r.model_dir << ": "
      << (r.reload_error <= reload_tol ? "ok" : "FAILED") << "\n";
  out << std::defaultfloat << "  time            " << std::fixed << std::setprecision(1) << t.seconds
      << " s training on " << where.device.str() << " (" << precision_name(where.precision) << ")";
  if (t.peak_device_bytes) out << ", peak device memory " << std::setprecision(1) << double(t.peak_device_bytes) / 1e6 << " MB";
  out << "\n  files           " << t.adapter_path << ", " << t.checkpoint_path << ", " << dir << "/loss.csv, " << dir
      << "/loss.png\n" << std::defaultfloat;
}

}  // namespace

BuiltinReport run_builtin_unet_task(const BuiltinOptions& opt, std::ostream& out, std::ostream& log) {
  const bool lora = opt.adapter == "lora";
  LOOM_CHECK(lora || opt.adapter == "custom_diffusion", "--adapter must be lora or custom_diffusion, got '",
             opt.adapter, "'");
  BuiltinReport report;
  const std::string dir = opt.out_dir;
  report.model_dir = dir + "/base_model";
  report.data_path = dir + "/data.safetensors";

  const unet::UNet2DConditionConfig config = unet::UNet2DConditionConfig::from_json_text(kConfigJson, "built-in");
  Generator base_gen(opt.seed), teacher_gen(opt.seed), change_gen(opt.seed + 101), data_gen(opt.seed + 202);
  auto base = std::make_shared<unet::UNet2DConditionModel>(config, base_gen);
  unet::UNet2DConditionModel teacher(config, teacher_gen);
  std::map<std::string, Tensor> deltas;
  for (const std::string& path : changed_modules(teacher, lora)) {
    const Tensor w = teacher.find_parameter(path + ".weight").tensor();
    deltas[path] = hidden_change(w, lora, change_gen);
    teacher.set_parameter_data(path + ".weight", ops::add(w, deltas[path]));
  }
  base->eval(), teacher.eval();
  DiffusionData data;
  const Tensor noisy = make_data(teacher, data, data_gen);

  TrainOptions t;
  t.out_dir = dir, t.quiet = opt.quiet, t.seed = opt.seed, t.adapter = opt.adapter;
  t.device = opt.device, t.precision = opt.precision, t.cuda_graph = opt.cuda_graph;
  t.diffusion.enabled = true;
  const Placement where = placement_of(opt.device, opt.precision);
  const bool low = where.precision == Precision::BF16 || where.precision == Precision::F16;
  t.rank = opt.rank.value_or(kHiddenRank), t.alpha = double(t.rank), t.batch_size = kSamples;
  t.targets = {"attn2.to_v"};  // the LoRA adapts the projections the teacher changed
  t.optimizer = opt.optimizer.value_or("adam"), t.lr = opt.lr.value_or(lora ? 2e-2 : 5e-3);
  t.steps = opt.steps > 0 ? opt.steps : 200;
  t.scheduler = "cosine", t.warmup_steps = 10, t.max_grad_norm = 1.0;
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
  report.recovered = recovered_share(*base, r, deltas);
  const Tensor trained = predict(*base, data, noisy, where);
  const Tensor reloaded = reloaded_prediction(report, lora, data, noisy, where);
  report.reload_error = std::sqrt(squared_norm(ops::sub(reloaded, trained)) / squared_norm(trained));
  const double loss_target = low ? 0.10 : 0.02, reload_tol = low ? 1e-2 : 1e-5;
  report.passed = report.final_loss <= loss_target * report.start_loss && report.reload_error <= reload_tol;
  print_report(report, r, where, loss_target, reload_tol, dir, out);
  return report;
}

}  // namespace loom::trainer
