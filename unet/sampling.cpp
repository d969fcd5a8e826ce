#include "unet/sampling.h"

#include <memory>
#include <sstream>
#include <vector>

#include "attention/attention.h"
#include "autograd/variable.h"
#include "tensor/graph.h"
#include "tensor/ops.h"

namespace loom::unet {
namespace {

std::string shape_text(const Tensor& t) {
  std::ostringstream os;
  os << t.shape();
  return os.str();
}

void expect_shape(const Tensor& t, const char* name, const Shape& want, const std::string& what) {
  LOOM_CHECK(t.shape() == want, name, " has shape ", shape_text(t), ", expected ", what);
}

// The batch the UNet sees: [negative; positive] with guidance, else the positive alone.
Tensor batch_of(const Tensor& positive, const Tensor& negative, bool guided) {
  if (!positive.defined() && !negative.defined()) return Tensor();
  if (!guided) return positive;
  return ops::cat({negative, positive}, 0);
}

struct UNetBatch {
  Variable encoder_hidden_states, text_embeds;
  Tensor encoder_attention_mask, time_ids;
};

// The conditioning as the UNet receives it, on its device in its dtype.
UNetBatch unet_batch(const SamplingConditioning& c, bool guided, DType dtype, Device device) {
  auto to_model = [&](const Tensor& t) { return t.defined() ? t.to(device).to(dtype) : t; };
  UNetBatch b;
  b.encoder_hidden_states = Variable(to_model(batch_of(c.encoder_hidden_states, c.negative_encoder_hidden_states, guided)));
  if (c.encoder_attention_mask.defined() || c.negative_encoder_attention_mask.defined()) {
    const Shape mask_shape{c.encoder_hidden_states.size(0), c.encoder_hidden_states.size(1)};
    const Tensor pos = c.encoder_attention_mask.defined() ? c.encoder_attention_mask : Tensor::ones(mask_shape);
    const Tensor neg = c.negative_encoder_attention_mask.defined() ? c.negative_encoder_attention_mask
                                                                   : Tensor::ones(mask_shape);
    b.encoder_attention_mask = to_model(batch_of(pos.to(DType::F32), neg.to(DType::F32), guided));
  }
  if (c.text_embeds.defined()) {
    b.text_embeds = Variable(to_model(batch_of(c.text_embeds, c.negative_text_embeds, guided)));
    const Tensor neg_ids = c.negative_time_ids.defined() ? c.negative_time_ids : c.time_ids;
    b.time_ids = batch_of(c.time_ids.to(DType::F64), neg_ids.to(DType::F64), guided);
  }
  return b;
}

// ε = unet(x_in, t) for one sampling step. With graphs (CUDA) and more than one step: the first
// call runs eagerly (which warms up the libraries' handles and the allocator) and, once its
// kernels are queued, captures the forward for the later calls, which replay it. The capture and
// the graph's instantiation are host work (tens of ms for SDXL) done while the GPU runs the first
// step's kernels; captured at the second call instead, they ran with the GPU idle, since that
// call's inputs wait for the first step to finish. The captured forward reads what changes from
// step to step from tensors that stay alive and are refilled before each replay (the scaled
// latents, the timestep's sinusoidal projection, which the UNet computes on the host either way);
// the conditioning, and SDXL's time_ids projection, are the same at every step and are captured
// as they are. A capture that fails is noted in the report and the steps run eagerly.
class UNetStepForward {
 public:
  // steps: how many calls will come (no capture for one)
  UNetStepForward(const UNet2DConditionModel& unet, const UNetBatch& batch, bool graphs, int64_t steps,
                  SamplingReport& report)
      : unet_(unet), batch_(batch), graphs_(graphs && steps > 1), report_(report) {}

  // x_in: [B, C, h, w] on the UNet's device in its activation dtype. Returns ε [B, C_out, h, w]
  // in that dtype, a tensor of its own (not the graph's output, which the next replay rewrites).
  Tensor operator()(const Tensor& x_in, double t) {
    if (!graph_) {
      if (graphs_) prepare_capture(x_in, t);  // its upload waits for the GPU: before the step is queued
      const Tensor eps = unet_.forward(eager_inputs(x_in, t)).tensor();
      if (graphs_) capture(t);  // host work while the GPU runs the kernels queued above
      return eps;
    }
    sample_.copy_(x_in);
    upload_.copy(timestep_proj_, host_projection(x_in, t).timestep_proj);
    graph_->replay();
    ++report_.graph_replays;
    return out_.clone();
  }

 private:
  UNetInputs eager_inputs(const Tensor& x_in, double t) const {
    UNetInputs in;
    in.sample = Variable(x_in);
    in.timestep = Tensor::from_values({t}, {1}, DType::F64);
    in.encoder_hidden_states = batch_.encoder_hidden_states;
    in.encoder_attention_mask = batch_.encoder_attention_mask;
    in.text_embeds = batch_.text_embeds;
    in.time_ids = batch_.time_ids;
    return in;
  }

  // The step's timestep (and time_ids) projections, on the host in x_in's dtype.
  UNetInputs host_projection(const Tensor& x_in, double t) const {
    UNetInputs in = eager_inputs(x_in, t);
    unet_.project_timesteps(in, x_in.size(0), x_in.dtype(), Device::cpu());
    return in;
  }

  // The captured forward's inputs: sample_ and timestep_proj_ (refilled before each replay) and
  // the time_ids projection (uploaded now, synchronously).
  void prepare_capture(const Tensor& x_in, double t) {
    const Device device = x_in.device();
    const UNetInputs host = host_projection(x_in, t);
    sample_ = Tensor::empty(x_in.shape(), x_in.dtype(), device);
    timestep_proj_ = Tensor::empty(host.timestep_proj.shape(), host.timestep_proj.dtype(), device);
    if (host.time_ids_proj.defined()) time_ids_proj_ = host.time_ids_proj.to(device);
  }

  void capture(double t) {
    const Device device = sample_.device();
    UNetInputs in = eager_inputs(sample_, t);
    in.timestep_proj = timestep_proj_;
    in.time_ids_proj = time_ids_proj_;
    auto graph = std::make_unique<DeviceGraph>(device);
    try {
      graph->capture([&] { out_ = unet_.forward(in).tensor(); });
      graph_ = std::move(graph);
    } catch (const Error& e) {
      const std::string what = e.what();
      report_.graph_note = "CUDA graph capture of the UNet's forward failed, sampling eagerly: " +
                           what.substr(0, what.find('\n'));
      graphs_ = false;
      sample_ = timestep_proj_ = time_ids_proj_ = out_ = Tensor();
    }
  }

  const UNet2DConditionModel& unet_;
  const UNetBatch& batch_;
  bool graphs_;
  SamplingReport& report_;
  std::unique_ptr<DeviceGraph> graph_;
  Tensor sample_, timestep_proj_, time_ids_proj_, out_;  // the captured forward's inputs and output
  PinnedUpload upload_;
};

// Turns the context cache of every attention layer of `unet` on for its lifetime: the loop's
// prompt embeddings (UNetBatch, fixed for the loop) are projected to keys and values once. At the
// end the layers it turned on are turned off (emptied); one that was on already stays on.
class ContextCacheScope {
 public:
  explicit ContextCacheScope(const UNet2DConditionModel& unet) {
    for (const auto& [name, module] : unet.named_modules()) {
      const auto attn = std::dynamic_pointer_cast<const attention::Attention>(module);
      if (!attn || attn->context_cache()) continue;
      attn->set_context_cache(true);
      layers_.push_back(attn);
    }
  }
  ~ContextCacheScope() {
    for (const auto& attn : layers_) attn->set_context_cache(false);
  }
  ContextCacheScope(const ContextCacheScope&) = delete;
  ContextCacheScope& operator=(const ContextCacheScope&) = delete;

 private:
  std::vector<std::shared_ptr<const attention::Attention>> layers_;
};

}  // namespace

void check_sampling_inputs(const UNet2DConditionConfig& config, const Shape& latents, const SamplingConditioning& c,
                           double guidance_scale) {
  LOOM_CHECK(latents.size() == 4 && latents[1] == config.in_channels, "latents have shape ", latents,
             ", expected [N, ", config.in_channels, ", h, w] (in_channels ", config.in_channels, ")");
  const int64_t n = latents[0];
  const Tensor& ehs = c.encoder_hidden_states;
  LOOM_CHECK(ehs.defined(), "encoder_hidden_states is missing (the prompt's embeddings, [N, K, ",
             config.cross_attention_dim.at(0), "])");
  const int64_t cad = config.cross_attention_dim.at(0);
  LOOM_CHECK(ehs.dim() == 3 && ehs.size(0) == n && ehs.size(2) == cad, "encoder_hidden_states has shape ",
             ehs.shape(), ", expected [", n, ", K, ", cad, "] (N from the latents, cross_attention_dim ", cad, ")");
  const int64_t k = ehs.size(1);
  const bool guided = guidance_scale > 1.0;
  if (guided) {
    LOOM_CHECK(c.negative_encoder_hidden_states.defined(), "negative_encoder_hidden_states is missing: guidance scale ",
               guidance_scale, " > 1 needs the negative prompt's embeddings [", n, ", ", k, ", ", cad,
               "] (or --guidance-scale 1 for no guidance)");
    expect_shape(c.negative_encoder_hidden_states, "negative_encoder_hidden_states", ehs.shape(),
                 "the shape of encoder_hidden_states " + shape_text(ehs) + " (pad both prompts to the same length)");
  }
  for (const auto& [t, name] : {std::pair{c.encoder_attention_mask, "encoder_attention_mask"},
                                std::pair{c.negative_encoder_attention_mask, "negative_encoder_attention_mask"}})
    if (t.defined()) expect_shape(t, name, Shape{n, k}, "[N, K] = [" + std::to_string(n) + ", " + std::to_string(k) + "]");

  const bool text_time = config.addition_embed_type == "text_time";
  if (!text_time) {
    for (const auto& [t, name] : {std::pair{c.text_embeds, "text_embeds"}, std::pair{c.time_ids, "time_ids"},
                                  std::pair{c.negative_text_embeds, "negative_text_embeds"},
                                  std::pair{c.negative_time_ids, "negative_time_ids"}})
      LOOM_CHECK(!t.defined(), name, " is given but the UNet's config has no addition_embed_type \"text_time\"");
    return;
  }
  const int64_t d = config.text_embeds_dim();
  const std::string te_shape = "[" + std::to_string(n) + ", " + std::to_string(d) + "]";
  const std::string ti_shape = "[" + std::to_string(n) + ", 6]";
  LOOM_CHECK(c.text_embeds.defined(), "text_embeds is missing: the UNet's config has addition_embed_type \"text_time\" "
             "(SDXL), which needs the pooled prompt embedding text_embeds ", te_shape, " and time_ids ", ti_shape);
  LOOM_CHECK(c.time_ids.defined(), "time_ids is missing: addition_embed_type \"text_time\" needs time_ids ", ti_shape,
             " (original size, crop top-left, target size)");
  expect_shape(c.text_embeds, "text_embeds", Shape{n, d}, te_shape);
  expect_shape(c.time_ids, "time_ids", Shape{n, 6}, ti_shape);
  if (c.negative_time_ids.defined()) expect_shape(c.negative_time_ids, "negative_time_ids", Shape{n, 6}, ti_shape);
  if (guided) {
    LOOM_CHECK(c.negative_text_embeds.defined(), "negative_text_embeds is missing: guidance scale ", guidance_scale,
               " > 1 needs the negative prompt's pooled embedding ", te_shape,
               " (SDXL's pipeline uses zeros for an empty negative prompt)");
    expect_shape(c.negative_text_embeds, "negative_text_embeds", Shape{n, d}, te_shape);
  }
}

Tensor sample_latents(const UNet2DConditionModel& unet, Scheduler& scheduler, const Tensor& latents,
                      const SamplingConditioning& cond, const SamplingOptions& options, const SamplingCallback& on_step,
                      SamplingReport* report) {
  check_sampling_inputs(unet.config(), latents.shape(), cond, options.guidance_scale);
  NoGradGuard no_grad;
  const bool guided = options.guidance_scale > 1.0;
  const int64_t n = latents.size(0);
  const UNetBatch batch = unet_batch(cond, guided, options.model_dtype, latents.device());
  scheduler.set_timesteps(options.steps);
  SamplingReport local_report;
  SamplingReport& rep = report ? *report : local_report;
  const ContextCacheScope context_cache(unet);  // outlives unet_step: its graph reads the cached keys
  UNetStepForward unet_step(unet, batch, options.cuda_graph && device_graphs_supported(latents.device()),
                            scheduler.num_steps(), rep);
  Tensor x = latents;
  for (int64_t i = 0; i < scheduler.num_steps(); ++i) {
    const double t = scheduler.timesteps()[size_t(i)];
    Tensor x_in = scheduler.scale_model_input(guided ? ops::cat({x, x}, 0) : x, i);
    Tensor eps = unet_step(x_in.to(options.model_dtype), t).to(x.dtype());
    if (guided) {  // [2N] -> uncond [N], cond [N]
      const Tensor uncond = eps.narrow(0, 0, n), text = eps.narrow(0, n, n);
      eps = ops::add(uncond, ops::mul_scalar(ops::sub(text, uncond), options.guidance_scale));
    }
    x = scheduler.step(eps.contiguous(), i, x);
    if (on_step) on_step({i, scheduler.num_steps(), t});
  }
  return x;
}

}  // namespace loom::unet
