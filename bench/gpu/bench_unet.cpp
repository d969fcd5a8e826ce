// A LoRA training step with the diffusion objective, the inference forward and a sampling step
// (classifier-free guidance: the UNet on a batch of 2N) of the whole UNet2DConditionModel on a
// device, at Stable Diffusion 1.5's config (64×64 latents, context 77×768) and SDXL's (128×128
// latents, context 77×2048, text_time), random weights (bench/gpu/configs/*.json are the real
// configs' fields). LoRA r4 α4 on to_q/to_k/to_v/to_out.0 of every attention, AdamW, epsilon
// loss. Median of --reps after warm-ups, CUDA events; peak device memory of each phase.
// bench/gpu/diffusers_unet.py times diffusers + PEFT the same way; run both in one call. Not a test.
//
// The step and the forward are also timed replayed from a CUDA graph captured once
// (step_graph_ms, forward_graph_ms; the noisy latents and the time projections computed once
// outside the graph, the AdamW update eager after each replay); null, with graph_failure saying
// why, when the capture fails.
// --no-cuda-graph times only the eager way. step_ms / forward_ms stay the eager times.
// With LOOM_CUDA_PROFILE=1 each phase's kernel table goes to stderr on its own (the sampling loop's
// at exit); run with --no-cuda-graph for tables of every phase (graph replays are not profiled).
// sample_loop_step_ms: `loom sample`'s own loop (unet::sample_latents, DDIM, 10 steps, guidance
// 7.5: the UNet on 2N), its time over the steps; the UNet replayed from a graph after the first
// step unless --no-cuda-graph (sample_loop_graph_replays says how many steps were replays).
// cfg_sample_step_fused_ms, sample_loop_fused_step_ms: the same with the LoRA fused into the
// weights first (LoraSet::fuse), which is what `loom sample` does by default (--no-fuse: not);
// sample_loop_unguided_fused_step_ms: that loop at guidance 1 (the UNet on N latents).
//
// --sampling-only: the LoRA fused at once, then only the two fused loops (guided and not): for A/B
// runs of forward kernels, without the minutes of the other phases.
//
//   loom_bench_unet --config FILE.json [--batch N] [--precision bf16|f32] [--reps N] [--name NAME] [--no-cuda-graph]
//                   [--sampling-only]
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "adapters/lora.h"
#include "autograd/ops.h"
#include "bench/gpu/device_timing.h"
#include "optim/optim.h"
#include "tensor/backend.h"
#include "tensor/ops.h"
#include "tensor/device_timer.h"
#include "tensor/precision.h"
#include "tensor/random.h"
#include "unet/config.h"
#include "unet/sampling.h"
#include "unet/schedulers.h"
#include "unet/diffusion.h"
#include "unet/unet.h"

using namespace loom;

namespace {

using bench::median_ms;

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  if (!f) {
    std::fprintf(stderr, "loom_bench_unet: cannot open %s\n", path.c_str());
    std::exit(2);
  }
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// The conditioning of `loom sample`'s loop: random prompt and negative-prompt embeddings (and
// SDXL's pooled embeddings and time ids) for `batch` latents.
unet::SamplingConditioning random_conditioning(const unet::UNet2DConditionConfig& cfg, int64_t batch, int64_t cross,
                                               Generator& gen, Device dev) {
  unet::SamplingConditioning cond;
  cond.encoder_hidden_states = Tensor::randn({batch, 77, cross}, gen, DType::F32, dev);
  cond.negative_encoder_hidden_states = Tensor::randn({batch, 77, cross}, gen, DType::F32, dev);
  if (cfg.addition_embed_type == "text_time") {
    cond.text_embeds = Tensor::randn({batch, cfg.text_embeds_dim()}, gen, DType::F32, dev);
    cond.negative_text_embeds = Tensor::zeros({batch, cfg.text_embeds_dim()}, DType::F32, dev);
    cond.time_ids = Tensor::full({batch, 6}, 1024.0, DType::F32, dev);
  }
  return cond;
}

// The median time of `loom sample`'s whole loop (DDIM, so.steps steps) over max(1, reps / 4) runs.
double time_sample_loop(const unet::UNet2DConditionModel& model, const Tensor& latents,
                        const unet::SamplingConditioning& cond, const unet::SamplingOptions& so, int reps, Device dev,
                        unet::SamplingReport& report) {
  return median_ms(dev, std::max(1, reps / 4), [&] {
    const auto scheduler = unet::make_scheduler(unet::SchedulerConfig::stable_diffusion_v1_5(unet::SchedulerKind::DDIM));
    report = {};
    unet::sample_latents(model, *scheduler, latents, cond, so, {}, &report);
  });
}

}  // namespace

int main(int argc, char** argv) {
  std::string config_path, precision = "bf16", name = "unet";
  int reps = 10, batch = 1;
  bool graphs = true, sampling_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--config" && i + 1 < argc) config_path = argv[++i];
    else if (a == "--precision" && i + 1 < argc) precision = argv[++i];
    else if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (a == "--batch" && i + 1 < argc) batch = std::atoi(argv[++i]);
    else if (a == "--name" && i + 1 < argc) name = argv[++i];
    else if (a == "--no-cuda-graph") graphs = false;
    else if (a == "--sampling-only") sampling_only = true;
    else {
      std::fprintf(stderr, "usage: loom_bench_unet --config FILE.json [--batch N] [--precision bf16|f32] [--reps N] "
                           "[--name NAME] [--no-cuda-graph] [--sampling-only]\n");
      return 2;
    }
  }
  if (config_path.empty() || !cuda_available()) {
    std::fprintf(stderr, "loom_bench_unet: needs --config and a CUDA device\n");
    return 2;
  }
  const Device dev = Device::cuda(0);
  const Precision prec = parse_precision(precision);
  set_allow_tf32(prec == Precision::TF32);
  const DType act = storage_dtype(prec);
  const unet::UNet2DConditionConfig cfg = unet::UNet2DConditionConfig::from_json_text(read_text(config_path), config_path);

  Generator gen(0);
  auto model = std::make_shared<unet::UNet2DConditionModel>(cfg, gen);
  model->to(act);  // cast on the host, then move (as trainer::place_model)
  model->to(dev);
  adapters::LoraSet lora(model);
  adapters::LoraConfig lc;
  lc.rank = 4, lc.alpha = 4.0, lc.targets = {"to_q", "to_k", "to_v", "to_out.0"};
  lora.add("default", lc, gen);
  optim::OptimizerConfig oc;
  oc.lr = 1e-4;
  auto opt = optim::make_optimizer("adamw", lora.trainable_parameters(), oc);

  const int64_t side = cfg.sample_size.value_or(64);
  const int64_t cross = cfg.cross_attention_dim.empty() ? 768 : cfg.cross_attention_dim.front();
  const bool text_time = cfg.addition_embed_type == "text_time";
  auto inputs = [&](int64_t n) {
    unet::UNetInputs in;
    in.sample = Variable(Tensor::randn({n, cfg.in_channels, side, side}, gen, act, dev));
    in.encoder_hidden_states = Variable(Tensor::randn({n, 77, cross}, gen, act, dev));
    in.timestep = Tensor::full({n}, 500.0, DType::F32, dev);
    if (text_time) {
      in.text_embeds = Variable(Tensor::randn({n, cfg.text_embeds_dim()}, gen, act, dev));
      in.time_ids = Tensor::full({n, 6}, 1024.0, act, dev);
    }
    return in;
  };
  const unet::DDPMSchedule schedule;
  const Tensor latents = Tensor::randn({batch, cfg.in_channels, side, side}, gen, DType::F32, dev);
  const int64_t loop_steps = 10;
  unet::SamplingOptions so;
  so.steps = loop_steps, so.guidance_scale = 7.5, so.model_dtype = act, so.cuda_graph = graphs;
  if (sampling_only) {  // the fused guided loop and the unguided one only: A/B runs of forward kernels
    model->eval();
    lora.fuse();
    const unet::SamplingConditioning cond = random_conditioning(cfg, batch, cross, gen, dev);
    unet::SamplingReport guided, unguided;
    const double guided_ms = time_sample_loop(*model, latents, cond, so, reps, dev, guided);
    so.guidance_scale = 1.0;
    const double unguided_ms = time_sample_loop(*model, latents, cond, so, reps, dev, unguided);
    std::printf("{\"impl\":\"loom\",\"config\":\"%s\",\"batch\":%d,\"precision\":\"%s\",\"sampling_only\":true,"
                "\"sample_loop_fused_step_ms\":%.3f,\"sample_loop_unguided_fused_step_ms\":%.3f}\n",
                name.c_str(), batch, precision.c_str(), guided_ms / double(loop_steps), unguided_ms / double(loop_steps));
    return 0;
  }
  const Tensor noise = Tensor::randn({batch, cfg.in_channels, side, side}, gen, DType::F32, dev);
  unet::UNetInputs train_in = inputs(batch);
  std::vector<float> tsteps(static_cast<size_t>(batch), 0.f);
  for (int64_t i = 0; i < batch; ++i) tsteps[size_t(i)] = float((100 + 311 * i) % 1000);
  train_in.timestep = Tensor::from_vector(tsteps, {batch}, dev);

  model->train();
  print_device_profile_section("setup");  // LOOM_CUDA_PROFILE=1: one table per phase from here
  reset_peak_device_memory(dev);
  const size_t weights = device_memory(dev).in_use;
  const double step_ms = median_ms(dev, reps, [&] {
    opt->zero_grad();
    train_in.sample = Variable(schedule.add_noise(latents, noise, train_in.timestep).to(act));
    const Variable pred = model->forward(train_in);
    Variable loss = mse_loss(to_dtype(pred, DType::F32), Variable(noise));
    loss.backward();
    opt->step();
  });
  const double step_peak = double(device_memory(dev).peak) / 1e9;
  print_device_profile_section("training step, eager (warm-ups and timed reps)");
  bench::GraphTiming step_graph;
  if (graphs) {
    // once, outside the graph: the noisy latents and the time projections (host work)
    train_in.sample = Variable(schedule.add_noise(latents, noise, train_in.timestep).to(act));
    model->project_timesteps(train_in, batch, act, dev);
    step_graph = bench::graph_median_ms(
        dev, reps,
        [&] {
          opt->zero_grad();
          const Variable pred = model->forward(train_in);
          mse_loss(to_dtype(pred, DType::F32), Variable(noise)).backward();
        },
        [&] { opt->step(); });
  }

  print_device_profile_section("training step from a CUDA graph (replays are not profiled)");
  model->eval();
  const unet::UNetInputs fwd_in = inputs(batch);
  reset_peak_device_memory(dev);
  const double fwd_ms = median_ms(dev, reps, [&] {
    NoGradGuard ng;
    model->forward(fwd_in);
  });
  const double fwd_peak = double(device_memory(dev).peak) / 1e9;
  print_device_profile_section("forward, eager");
  bench::GraphTiming fwd_graph;
  if (graphs) {
    unet::UNetInputs projected = fwd_in;
    model->project_timesteps(projected, batch, act, dev);
    fwd_graph = bench::graph_median_ms(
        dev, reps,
        [&] {
          NoGradGuard ng;
          model->forward(projected);
        },
        [] {});
  }
  print_device_profile_section("forward from a CUDA graph (replays are not profiled)");
  const std::string failure = !step_graph.failure.empty() ? step_graph.failure : fwd_graph.failure;
  // a sampling step with guidance: the UNet on uncond + cond (2N), then the guidance combination
  const unet::UNetInputs cfg_in = inputs(2 * batch);
  auto guided_step = [&] {
    NoGradGuard ng;
    const Tensor y = model->forward(cfg_in).tensor();
    const Tensor u = y.narrow(0, 0, batch), c = y.narrow(0, batch, batch);
    (void)ops::add(u, ops::mul_scalar(ops::sub(c, u), 7.5));
  };
  const double sample_ms = median_ms(dev, reps, guided_step);
  print_device_profile_section("guided sampling step (the UNet on 2N latents), eager");
  // `loom sample`'s loop: DDIM, 10 steps, guidance 7.5, per step
  const unet::SamplingConditioning cond = random_conditioning(cfg, batch, cross, gen, dev);
  auto sample_loop = [&](unet::SamplingReport& report) {
    return time_sample_loop(*model, latents, cond, so, reps, dev, report);
  };
  unet::SamplingReport loop_report;
  const double loop_ms = sample_loop(loop_report);
  print_device_profile_section("sampling loop, LoRA applied at every step");
  // `loom sample`'s default: the LoRA fused into the weights before the first step
  lora.fuse();
  print_device_profile_section("LoRA fused into the weights (once, f64)");
  const double sample_fused_ms = median_ms(dev, reps, guided_step);
  print_device_profile_section("guided sampling step, LoRA fused, eager");
  unet::SamplingReport fused_report;
  const double loop_fused_ms = sample_loop(fused_report);
  print_device_profile_section("sampling loop, LoRA fused");
  // without guidance (guidance_scale 1: the UNet on N latents, as diffusers' forward)
  so.guidance_scale = 1.0;
  unet::SamplingReport unguided_report;
  const double loop_unguided_ms = sample_loop(unguided_report);
  print_device_profile_section("sampling loop without guidance, LoRA fused");
  lora.unfuse();
  std::printf("{\"impl\":\"loom\",\"config\":\"%s\",\"batch\":%d,\"precision\":\"%s\",\"step_ms\":%.3f,"
              "\"step_peak_gb\":%.3f,\"forward_ms\":%.3f,\"forward_peak_gb\":%.3f,\"cfg_sample_step_ms\":%.3f,"
              "\"weights_gb\":%.3f,\"step_graph_ms\":%s,\"forward_graph_ms\":%s,\"graph_failure\":%s,"
              "\"sample_loop_step_ms\":%.3f,\"sample_loop_graph_replays\":%lld,\"sample_loop_note\":%s,"
              "\"cfg_sample_step_fused_ms\":%.3f,\"sample_loop_fused_step_ms\":%.3f,"
              "\"sample_loop_fused_graph_replays\":%lld,\"sample_loop_unguided_fused_step_ms\":%.3f}\n",
              name.c_str(), batch, precision.c_str(), step_ms, step_peak, fwd_ms, fwd_peak, sample_ms,
              double(weights) / 1e9, bench::json_ms(step_graph.ms).c_str(), bench::json_ms(fwd_graph.ms).c_str(),
              graphs ? bench::json_string(failure).c_str() : "null", loop_ms / double(loop_steps),
              (long long)loop_report.graph_replays, bench::json_string(loop_report.graph_note).c_str(),
              sample_fused_ms, loop_fused_ms / double(loop_steps), (long long)fused_report.graph_replays,
              loop_unguided_ms / double(loop_steps));
  return 0;
}
