// Classifier-free guided sampling (SPEC §8 `loom sample`): the denoising loop of diffusers'
// StableDiffusionPipeline / StableDiffusionXLPipeline with a UNet2DConditionModel and one of
// the schedulers of unet/schedulers.h.
//
// Per step i (t = scheduler.timesteps()[i]):
//   guidance_scale > 1:  x_in = scale_model_input(cat([x, x]), i)            [2N, C, h, w]
//                        ε = unet(x_in, t, cat([negative, positive]) conditioning)
//                        ε = ε_uncond + guidance_scale · (ε_cond − ε_uncond)   (the two halves)
//   guidance_scale ≤ 1:  ε = unet(scale_model_input(x, i), t, positive conditioning) (diffusers'
//                        do_classifier_free_guidance is guidance_scale > 1)
//   x = scheduler.step(ε, i, x)
// The latents and the scheduler arithmetic stay in the latents' dtype (f32, or f64 for exact
// comparisons); the UNet runs in `model_dtype` (its activations: f32, bf16, f16, f64).
#pragma once

#include <functional>
#include <string>

#include "unet/schedulers.h"
#include "unet/unet.h"

namespace loom::unet {

// What the UNet is conditioned on. Shapes: N samples, K tokens, C = cross_attention_dim,
// D = the config's text_embeds width.
struct SamplingConditioning {
  Tensor encoder_hidden_states;           // [N, K, C]
  Tensor negative_encoder_hidden_states;  // [N, K, C]; needed when guidance_scale > 1
  Tensor encoder_attention_mask;          // [N, K] keep-mask, optional
  Tensor negative_encoder_attention_mask; // [N, K], optional (all kept when only the other is given)
  Tensor text_embeds, negative_text_embeds;  // [N, D] (addition_embed_type "text_time" only)
  Tensor time_ids, negative_time_ids;        // [N, 6] (text_time; negative_time_ids defaults to
                                             // time_ids, as the SDXL pipeline does)
};

struct SamplingOptions {
  int64_t steps = 30;
  double guidance_scale = 7.5;
  DType model_dtype = DType::F32;  // the UNet's activation dtype
  // On a device with graphs (CUDA): the UNet's forward runs eagerly at the first step, is captured
  // as a graph at the second and replayed from then on, with the same numbers (tensor/graph.h).
  // Ignored where device_graphs_supported() is false.
  bool cuda_graph = false;
};

// What sample_latents did besides its result.
struct SamplingReport {
  int64_t graph_replays = 0;  // steps whose UNet forward was a graph replay
  std::string graph_note;     // why graphs were not used although asked for (a failed capture), or ""
};

struct SamplingStep {
  int64_t step, num_steps;  // step counts from 0
  double timestep;
};
using SamplingCallback = std::function<void(const SamplingStep&)>;

// Checks `latents` [N, in_channels, h, w] and the conditioning against the UNet's config
// (Error naming the tensor, its shape and what was expected; the negative tensors are needed
// only when guidance_scale > 1).
void check_sampling_inputs(const UNet2DConditionConfig& config, const Shape& latents,
                           const SamplingConditioning& cond, double guidance_scale);

// Runs scheduler.set_timesteps(options.steps) and every step; returns the final latents.
// `latents` is the first step's input (noise already multiplied by init_noise_sigma), on the
// UNet's device; `on_step` is called after each step; `report`, when given, says whether the
// steps were graph replays. No autograd graph is built.
Tensor sample_latents(const UNet2DConditionModel& unet, Scheduler& scheduler, const Tensor& latents,
                      const SamplingConditioning& cond, const SamplingOptions& options,
                      const SamplingCallback& on_step = {}, SamplingReport* report = nullptr);

}  // namespace loom::unet
