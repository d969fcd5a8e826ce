// A LoRA training step and the inference forward of one spatial-transformer block on a device,
// at Stable Diffusion 1.5's first block (320 channels, 8 heads × 40, x (2,320,64,64), context
// (2,77,768)) and SDXL's first attention block (640 channels, 10 heads × 64, two transformer
// layers, linear projections, context (2,77,2048)). LoRA r4 α4 on to_q/to_k/to_v/to_out.0 of
// every attention, AdamW, MSE loss. Median of --reps (default 20) after 5 warm-ups, CUDA events;
// peak device memory of the timed steps. bench/gpu/diffusers_step.py times diffusers + PEFT on the
// same shapes; run both in one call. Not a test.
//
// The step and the forward are timed twice in one run: eagerly (step_eager_ms, forward_eager_ms)
// and replayed from a CUDA graph captured once (step_graph_ms, forward_graph_ms: the forward and
// backward captured, the AdamW update eager after each replay, as the trainer does; null, with
// graph_failure saying why, when the capture fails). step_ms / forward_ms are the default
// configuration's: the graph's when it was captured, else the eager one; --no-cuda-graph times
// only the eager way.
//
//   loom_bench_step [--precision bf16|f32|tf32] [--backend auto|flash|math] [--reps N] [--config sd15|sdxl]
//                   [--no-cuda-graph] [--losses N]   (print the losses of N steps instead of timing)
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "adapters/lora.h"
#include "attention/sdpa.h"
#include "attention/transformer.h"
#include "autograd/ops.h"
#include "optim/optim.h"
#include "tensor/backend.h"
#include "bench/gpu/device_timing.h"
#include "tensor/device_timer.h"
#include "tensor/precision.h"
#include "tensor/random.h"

using namespace loom;

namespace {

using bench::median_ms;

}  // namespace

int main(int argc, char** argv) {
  std::string precision = "bf16", backend = "auto", which = "sd15";
  int reps = 20, loss_steps = 0;
  bool graphs = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--precision" && i + 1 < argc) precision = argv[++i];
    else if (a == "--backend" && i + 1 < argc) backend = argv[++i];
    else if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (a == "--config" && i + 1 < argc) which = argv[++i];
    else if (a == "--losses" && i + 1 < argc) loss_steps = std::atoi(argv[++i]);
    else if (a == "--no-cuda-graph") graphs = false;
    else {
      std::fprintf(stderr, "usage: loom_bench_step [--precision bf16|f32|tf32] [--backend auto|flash|math] [--reps N] "
                           "[--config sd15|sdxl] [--no-cuda-graph] [--losses N]\n");
      return 2;
    }
  }
  if (!cuda_available()) {
    std::fprintf(stderr, "loom_bench_step: no CUDA device\n");
    return 2;
  }
  const Device dev = Device::cuda(0);
  const Precision prec = parse_precision(precision);
  set_allow_tf32(prec == Precision::TF32);
  attention::set_default_backend(attention::parse_backend(backend, "--backend"));

  attention::Transformer2DConfig c;
  int64_t side = 64;
  if (which == "sdxl") {
    c.in_channels = 640, c.num_attention_heads = 10, c.attention_head_dim = 64, c.num_layers = 2;
    c.cross_attention_dim = 2048, c.use_linear_projection = true;
  } else {
    c.in_channels = 320, c.num_attention_heads = 8, c.attention_head_dim = 40, c.cross_attention_dim = 768;
  }
  Generator gen(0);
  auto model = std::make_shared<attention::Transformer2DModel>(c, gen);
  model->to(dev);
  model->to(storage_dtype(prec));
  adapters::LoraSet lora(model);
  adapters::LoraConfig lc;
  lc.rank = 4, lc.alpha = 4.0, lc.targets = {"to_q", "to_k", "to_v", "to_out.0"};
  lora.add("default", lc, gen);
  optim::OptimizerConfig oc;
  oc.lr = 1e-4;
  auto opt = optim::make_optimizer("adamw", lora.trainable_parameters(), oc);

  const DType act = storage_dtype(prec);
  const Tensor x = Tensor::randn({2, c.in_channels, side, side}, gen, act, dev);
  const Tensor ctx = Tensor::randn({2, 77, *c.cross_attention_dim}, gen, act, dev);
  const Tensor target = Tensor::randn({2, c.in_channels, side, side}, gen, DType::F32, dev);

  model->train();
  if (loss_steps > 0) {  // the losses of that many steps from this seed (flash vs math comparisons)
    std::printf("{\"backend\":\"%s\",\"precision\":\"%s\",\"losses\":[", backend.c_str(), precision.c_str());
    for (int s = 0; s < loss_steps; ++s) {
      opt->zero_grad();
      Variable loss = mse_loss(to_dtype(model->forward(Variable(x), Variable(ctx)), DType::F32), Variable(target));
      loss.backward();
      opt->step();
      std::printf("%s%.9g", s ? "," : "", loss.tensor().item());
    }
    std::printf("]}\n");
    return 0;
  }
  reset_peak_device_memory(dev);
  const size_t base = device_memory(dev).in_use;
  auto forward_backward = [&] {
    opt->zero_grad();
    const Variable y = model->forward(Variable(x), Variable(ctx));
    Variable loss = mse_loss(to_dtype(y, DType::F32), Variable(target));
    loss.backward();
  };
  const double step_eager_ms = median_ms(dev, reps, [&] {
    forward_backward();
    opt->step();
  });
  const double step_peak = double(device_memory(dev).peak) / 1e9;
  // The graph's gradients stay in the parameters between replays (zero_grad runs on the host
  // at capture only): the update reads what each replay wrote.
  reset_peak_device_memory(dev);
  bench::GraphTiming step_graph;
  if (graphs) step_graph = bench::graph_median_ms(dev, reps, forward_backward, [&] { opt->step(); });
  const double step_graph_peak = double(device_memory(dev).peak) / 1e9;
  model->eval();
  reset_peak_device_memory(dev);
  auto forward = [&] {
    NoGradGuard ng;
    model->forward(Variable(x), Variable(ctx));
  };
  const double fwd_ms = median_ms(dev, reps, forward);
  const double fwd_peak = double(device_memory(dev).peak) / 1e9;
  bench::GraphTiming fwd_graph;
  if (graphs) fwd_graph = bench::graph_median_ms(dev, reps, forward, [] {});
  const std::string failure = !step_graph.failure.empty() ? step_graph.failure : fwd_graph.failure;
  std::printf("{\"impl\":\"loom\",\"config\":\"%s\",\"precision\":\"%s\",\"backend\":\"%s\",\"step_ms\":%.3f,"
              "\"step_eager_ms\":%.3f,\"step_graph_ms\":%s,\"step_peak_gb\":%.3f,\"step_graph_peak_gb\":%.3f,"
              "\"forward_ms\":%.3f,\"forward_eager_ms\":%.3f,\"forward_graph_ms\":%s,\"forward_peak_gb\":%.3f,"
              "\"weights_gb\":%.3f,\"graph_failure\":%s}\n",
              which.c_str(), precision.c_str(), backend.c_str(), step_graph.ms >= 0 ? step_graph.ms : step_eager_ms,
              step_eager_ms, bench::json_ms(step_graph.ms).c_str(), step_peak, step_graph_peak,
              fwd_graph.ms >= 0 ? fwd_graph.ms : fwd_ms, fwd_ms, bench::json_ms(fwd_graph.ms).c_str(), fwd_peak,
              double(base) / 1e9, graphs ? bench::json_string(failure).c_str() : "null");
  return 0;
}
