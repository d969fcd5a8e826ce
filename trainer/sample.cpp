#include "trainer/sample.h"

#include <chrono>
#include <cmath>
#include <iomanip>
#include <ostream>
#include <set>
#include <sstream>

#include "tensor/ops.h"
#include "tensor/precision.h"
#include "tensor/random.h"
#include "unet/unet_io.h"

namespace loom::trainer {
namespace {

// "m:ss" (or "h:mm:ss") for a progress line.
std::string clock_text(double seconds) {
  const int64_t s = int64_t(std::max(0.0, seconds) + 0.5);
  std::ostringstream os;
  if (s >= 3600) os << s / 3600 << ":" << std::setw(2) << std::setfill('0') << (s / 60) % 60;
  else os << s / 60;
  os << ":" << std::setw(2) << std::setfill('0') << s % 60;
  return os.str();
}

// The scheduler the options name, configured from --scheduler-config or SD 1.5's defaults.
unet::SchedulerConfig scheduler_config_of(const SampleOptions& o) {
  unet::SchedulerKind kind;
  try {
    kind = unet::parse_scheduler_kind(o.scheduler);
  } catch (const Error& e) {
    throw OptionError(std::string("--scheduler: ") + e.what());
  }
  return o.scheduler_config.empty() ? unet::SchedulerConfig::stable_diffusion_v1_5(kind)
                                    : unet::SchedulerConfig::from_file(o.scheduler_config, kind);
}

void check_options(const SampleOptions& o, const SampleInputs& in) {
  if (o.steps < 1) throw OptionError("--steps must be at least 1, got " + std::to_string(o.steps));
  if (!std::isfinite(o.guidance_scale))
    throw OptionError("--guidance-scale must be a finite number, got " + std::to_string(o.guidance_scale));
  if (in.latents.defined() && (o.seed || o.height || o.width))
    throw OptionError(std::string("the input file holds latents, the starting point of sampling; ") +
                      (o.seed ? "--seed" : o.height ? "--height" : "--width") +
                      " makes seeded noise instead: leave it out, or remove 'latents' from the input");
  for (const auto& [v, flag] : {std::pair{o.height, "--height"}, std::pair{o.width, "--width"}})
    if (v && (*v <= 0 || *v % kVaeScaleFactor != 0))
      throw OptionError(std::string(flag) + " must be a positive multiple of " + std::to_string(kVaeScaleFactor) +
                        " (the VAE's downsampling), got " + std::to_string(*v));
}

// Seeded noise [N, in_channels, height/8, width/8] · init_noise_sigma (f32, as diffusers' prepare_latents).
Tensor seeded_latents(const SampleOptions& o, const unet::UNet2DConditionConfig& config, int64_t batch,
                      double init_noise_sigma) {
  int64_t size[2];
  const std::optional<int64_t> given[2] = {o.height, o.width};
  for (int i = 0; i < 2; ++i) {
    if (!given[i] && !config.sample_size)
      throw OptionError(std::string("the UNet's config.json has no sample_size: give ") + (i ? "--width" : "--height"));
    size[i] = given[i] ? *given[i] / kVaeScaleFactor : *config.sample_size;
  }
  Generator gen(o.seed.value_or(0));
  const Tensor noise = Tensor::randn({batch, config.in_channels, size[0], size[1]}, gen, DType::F32);
  return ops::mul_scalar(noise, double(float(init_noise_sigma)));
}

}  // namespace

SampleInputs SampleInputs::load(const std::string& path) {
  const io::TensorFile f = io::read_tensor_file(path);
  SampleInputs in;
  unet::SamplingConditioning& c = in.cond;
  in.unused_keys = take_named_tensors(f, {{"latents", &in.latents},
                                          {"encoder_hidden_states", &c.encoder_hidden_states},
                                          {"negative_encoder_hidden_states", &c.negative_encoder_hidden_states},
                                          {"encoder_attention_mask", &c.encoder_attention_mask},
                                          {"negative_encoder_attention_mask", &c.negative_encoder_attention_mask},
                                          {"text_embeds", &c.text_embeds},
                                          {"negative_text_embeds", &c.negative_text_embeds},
                                          {"time_ids", &c.time_ids},
                                          {"negative_time_ids", &c.negative_time_ids}});
  if (!c.encoder_hidden_states.defined())
    throw io::FileError(path, "no tensor 'encoder_hidden_states' (the prompt's embeddings [N, K, C]; loom sample also "
                              "reads negative_encoder_hidden_states, latents, text_embeds, time_ids and their "
                              "negative_ counterparts)");
  return in;
}

SampleResult sample_model(const SampleOptions& o, const SampleInputs& in, const std::string& input_name,
                          std::ostream* log, std::ostream* progress) {
  check_options(o, in);
  SampleResult result;
  const unet::SchedulerConfig sched_config = scheduler_config_of(o);
  result.notes = sched_config.notes;
  const Placement where = placement_of(o.device, o.precision);

  unet::LoadedUNet loaded = unet::load_unet(o.model_dir, o.config);
  const std::shared_ptr<unet::UNet2DConditionModel> model = loaded.model;
  result.notes.insert(result.notes.end(), loaded.notes.begin(), loaded.notes.end());  // config.json's notes too
  note_unused_keys(in.unused_keys, input_name, "loom sample", result.notes);

  const std::unique_ptr<unet::Scheduler> scheduler = unet::make_scheduler(sched_config);
  try {
    scheduler->set_timesteps(o.steps);
  } catch (const Error& e) {
    throw OptionError(std::string("--steps ") + std::to_string(o.steps) + ": " + e.what());
  }
  result.timesteps = scheduler->timesteps();
  result.init_noise_sigma = scheduler->init_noise_sigma();
  const Tensor& ehs = in.cond.encoder_hidden_states;
  const int64_t batch = ehs.defined() && ehs.dim() > 0 ? ehs.size(0) : 1;  // (checked below)
  const Tensor latents = in.latents.defined() ? in.latents
                                              : seeded_latents(o, model->config(), batch, result.init_noise_sigma);
  try {
    unet::check_sampling_inputs(model->config(), latents.shape(), in.cond, o.guidance_scale);
  } catch (const Error& e) {
    throw io::FileError(input_name, e.what());
  }

  model->eval();
  place_model(*model, where);  // adapters loaded next are made on the device (f32 masters)
  io::AdapterLoadOptions lo;
  lo.strict = o.strict;
  const AttachedAdapters attached = attach_adapters(model, o.adapters, lo);
  result.reports = attached.reports;
  if (o.fuse && attached.lora) {  // fused once; the steps then run the plain UNet (SampleOptions::fuse)
    attached.lora->fuse();
    result.fused = true;
  }
  if (log) {
    for (const std::string& n : result.notes) *log << "loom: note: " << n << "\n";
    for (const auto& rep : result.reports) *log << rep.summary() << "\n";
    if (result.fused) *log << "loom: LoRA adapters fused into the UNet's weights for sampling (--no-fuse: applied at every step)\n";
  }

  unet::SamplingOptions so;
  so.steps = o.steps;
  so.guidance_scale = o.guidance_scale;
  so.model_dtype = storage_dtype(where.precision);
  so.cuda_graph = o.cuda_graph;
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  auto report = [&](const unet::SamplingStep& s) {
    if (!progress) return;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    const double per_step = elapsed / double(s.step + 1);
    std::ostringstream line;
    line << "step " << s.step + 1 << "/" << s.num_steps << "  t " << std::setprecision(6) << s.timestep << "  "
         << std::fixed << std::setprecision(2) << per_step << " s/step  ETA "
         << clock_text(per_step * double(s.num_steps - s.step - 1)) << "\n";
    *progress << line.str() << std::flush;
  };
  unet::SamplingReport sampling;
  result.latents = unet::sample_latents(*model, *scheduler, latents.to(where.device), in.cond, so, report, &sampling)
                       .to(DType::F32)
                       .to(Device::cpu());
  result.graph_replays = sampling.graph_replays;
  result.graph_note = sampling.graph_note;
  for (double v : result.latents.to_vector())
    if (!std::isfinite(v)) throw NumericalError("sample: the final latents hold NaN or Inf");
  return result;
}

}  // namespace loom::trainer
