#include "trainer/run_unet.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>

#include "tensor/graph.h"
#include "tensor/ops.h"
#include "unet/sampling.h"
#include "unet/unet_io.h"

namespace loom::trainer {

UNetRunInputs UNetRunInputs::load(const std::string& path) {
  const io::TensorFile f = io::read_tensor_file(path);
  UNetRunInputs in;
  in.unused_keys = take_named_tensors(f, {{"sample", &in.sample},
                                          {"timestep", &in.timestep},
                                          {"encoder_hidden_states", &in.encoder_hidden_states},
                                          {"encoder_attention_mask", &in.encoder_attention_mask},
                                          {"text_embeds", &in.text_embeds},
                                          {"time_ids", &in.time_ids}});
  for (const auto& [key, slot] : {std::pair<const char*, Tensor*>{"sample", &in.sample},
                                  {"timestep", &in.timestep},
                                  {"encoder_hidden_states", &in.encoder_hidden_states}})
    if (!slot->defined())
      throw io::FileError(path, std::string("no tensor '") + key + "' (loom run of a UNet reads sample [N, C, h, w], "
                                "timestep [N] / [1] / [], encoder_hidden_states [N, K, C], optional "
                                "encoder_attention_mask [N, K], and for SDXL text_embeds [N, D] and time_ids [N, 6])");
  return in;
}

namespace {

// The inputs against the config: the sampling checks (latents = sample) plus the timestep's shape.
void check_inputs(const unet::UNet2DConditionConfig& config, const UNetRunInputs& in, const std::string& input_name) {
  unet::SamplingConditioning cond;
  cond.encoder_hidden_states = in.encoder_hidden_states;
  cond.encoder_attention_mask = in.encoder_attention_mask;
  cond.text_embeds = in.text_embeds;
  cond.time_ids = in.time_ids;
  try {
    unet::check_sampling_inputs(config, in.sample.shape(), cond, 1.0);
  } catch (const Error& e) {
    throw io::FileError(input_name, e.what());
  }
  const int64_t n = in.sample.size(0), tn = in.timestep.numel();
  if (in.timestep.dim() > 1 || (tn != 1 && tn != n))
    throw io::FileError(input_name, ::loom::detail::concat("timestep has shape ", in.timestep.shape(), ": expected [",
                                                         n, "], [1] or []"));
}

// The inputs of rows [i, i + n) on the host: the file's tensors, the timestep (and SDXL's time_ids)
// f64 for the UNet's sinusoids.
unet::UNetInputs host_rows(const UNetRunInputs& in, int64_t i, int64_t n) {
  auto rows = [&](const Tensor& t) { return t.defined() ? t.narrow(0, i, n) : t; };
  unet::UNetInputs x;
  x.sample = Variable(rows(in.sample));
  const Tensor t = in.timestep.to(DType::F64);
  x.timestep = t.numel() == 1 ? t.reshape({1}) : t.narrow(0, i, n);
  x.encoder_hidden_states = Variable(rows(in.encoder_hidden_states));
  x.encoder_attention_mask = rows(in.encoder_attention_mask);
  if (in.text_embeds.defined()) x.text_embeds = Variable(rows(in.text_embeds));
  if (in.time_ids.defined()) x.time_ids = in.time_ids.to(DType::F64).narrow(0, i, n);
  return x;
}

// The UNet's forward of one full batch captured as a graph (CUDA): its inputs are device tensors
// that stay alive and are refilled from the host before each replay, the timestep and time_ids
// projections computed on the host as the UNet computes them in an eager forward.
class CapturedUNetForward {
 public:
  // Captures the forward of a batch shaped as `host` (host_rows); throws loom::Error when the
  // capture fails.
  CapturedUNetForward(const unet::UNet2DConditionModel& model, const unet::UNetInputs& host, DType act, Device device)
      : graph_(device) {
    const std::array<Tensor, kSlots> values = slot_values(model, host, act);
    for (size_t k = 0; k < kSlots; ++k)
      if (values[k].defined()) fixed_[k] = Tensor::empty(values[k].shape(), act, device);
    unet::UNetInputs x;
    x.sample = Variable(fixed_[kSample]);
    x.encoder_hidden_states = Variable(fixed_[kContext]);
    x.encoder_attention_mask = fixed_[kMask];
    if (fixed_[kTextEmbeds].defined()) x.text_embeds = Variable(fixed_[kTextEmbeds]);
    x.timestep = host.timestep;  // not read: the projections below are given
    x.timestep_proj = fixed_[kTimestepProj], x.time_ids_proj = fixed_[kTimeIdsProj];
    graph_.capture([&] { out_ = model.forward(x).tensor(); });
  }

  // The output of the batch `host` (its shapes those of the captured one), f32 on the CPU.
  Tensor run(const unet::UNet2DConditionModel& model, const unet::UNetInputs& host, DType act) {
    const std::array<Tensor, kSlots> values = slot_values(model, host, act);
    for (size_t k = 0; k < kSlots; ++k)
      if (values[k].defined()) uploads_[k].copy(fixed_[k], values[k]);
    graph_.replay();
    return out_.to(DType::F32).to(Device::cpu());  // waits for the replay
  }

 private:
  enum Slot { kSample, kContext, kMask, kTextEmbeds, kTimestepProj, kTimeIdsProj, kSlots };

  static std::array<Tensor, kSlots> slot_values(const unet::UNet2DConditionModel& model, const unet::UNetInputs& host,
                                                DType act) {
    unet::UNetInputs projected = host;
    model.project_timesteps(projected, host.sample.tensor().size(0), act, Device::cpu());
    return {host.sample.tensor(), host.encoder_hidden_states.tensor(), host.encoder_attention_mask,
            host.text_embeds.defined() ? host.text_embeds.tensor() : Tensor(), projected.timestep_proj,
            projected.time_ids_proj};
  }

  DeviceGraph graph_;
  std::array<Tensor, kSlots> fixed_;
  std::array<PinnedUpload, kSlots> uploads_;
  Tensor out_;
};

// The UNet over every row of `in`, `batch` rows at a time, f32 on the CPU. With `graphs` (CUDA),
// the forward of a full batch is captured after the first batch (which warms up eagerly) and
// replayed for the other full batches; a last, smaller batch runs eagerly. A capture that fails
// leaves a note in result.graph_note and the rest runs eagerly.
Tensor forward_batches(const unet::UNet2DConditionModel& model, const UNetRunInputs& in, int64_t batch,
                       const Placement& where, bool graphs, RunResult& result) {
  const DType act = storage_dtype(where.precision);
  const int64_t total = in.sample.size(0);
  std::unique_ptr<CapturedUNetForward> captured;
  std::vector<Tensor> outs;
  for (int64_t i = 0; i < total; i += batch) {
    const int64_t n = std::min(batch, total - i);
    const unet::UNetInputs host = host_rows(in, i, n);
    const bool full = n == batch && i > 0;
    if (graphs && full && !captured) {
      try {
        captured = std::make_unique<CapturedUNetForward>(model, host, act, where.device);
      } catch (const Error& e) {
        const std::string what = e.what();
        result.graph_note = "CUDA graph capture failed, running eagerly: " + what.substr(0, what.find('\n'));
        graphs = false;
      }
    }
    if (captured && full) {
      outs.push_back(captured->run(model, host, act));
      ++result.graph_replays;
      continue;
    }
    auto on_device = [&](const Tensor& t) { return t.defined() ? t.to(where.device).to(act) : t; };
    unet::UNetInputs x = host;
    x.sample = Variable(on_device(host.sample.tensor()));
    x.encoder_hidden_states = Variable(on_device(host.encoder_hidden_states.tensor()));
    x.encoder_attention_mask = on_device(host.encoder_attention_mask);
    if (host.text_embeds.defined()) x.text_embeds = Variable(on_device(host.text_embeds.tensor()));
    outs.push_back(model.forward(x).tensor().to(DType::F32).to(Device::cpu()));
  }
  return outs.size() == 1 ? outs[0] : ops::cat(outs, 0);
}

}  // namespace

RunResult run_unet(const RunOptions& o, const UNetRunInputs& in, const std::string& input_name) {
  LOOM_CHECK(o.batch_size > 0, "run: batch size must be positive");
  if (!o.prefix.empty())
    throw OptionError("--prefix " + o.prefix + ": " + o.model_dir + " holds a whole UNet (its config.json says "
                      "UNet2DConditionModel); --prefix selects a block of a UNet file for a one-block model");
  const Placement where = placement_of(o.device, o.precision);
  RunResult result;
  unet::LoadedUNet loaded = unet::load_unet(o.model_dir, o.config);
  const std::shared_ptr<unet::UNet2DConditionModel> model = loaded.model;
  result.model_notes = loaded.notes;
  note_unused_keys(in.unused_keys, input_name, "loom run", result.model_notes);
  check_inputs(model->config(), in, input_name);
  model->eval();
  place_model(*model, where);  // adapters loaded next are made on the device (f32 masters)
  std::optional<attention::ScopedAttentionBackend> scoped;
  if (o.backend) scoped.emplace(*o.backend);
  io::AdapterLoadOptions lo;
  lo.strict = o.strict;
  AttachedAdapters attached = attach_adapters(model, o.adapters, lo);
  result.reports = std::move(attached.reports);
  if (o.fuse && attached.lora) attached.lora->fuse();

  NoGradGuard no_grad;
  const bool graphs = o.cuda_graph && device_graphs_supported(where.device);
  result.output = forward_batches(*model, in, o.batch_size, where, graphs, result);
  for (double v : result.output.to_vector())
    if (!std::isfinite(v)) throw NumericalError("run: the UNet's output holds NaN or Inf");
  return result;
}

}  // namespace loom::trainer
