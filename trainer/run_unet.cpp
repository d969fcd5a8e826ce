#include "trainer/run_unet.h"

#include <algorithm>
#include <cmath>

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
  const DType act = storage_dtype(where.precision);
  const int64_t total = in.sample.size(0);
  std::vector<Tensor> outs;
  for (int64_t i = 0; i < total; i += o.batch_size) {
    const int64_t n = std::min(o.batch_size, total - i);
    auto rows = [&](const Tensor& t) { return t.defined() ? t.narrow(0, i, n).to(where.device).to(act) : t; };
    unet::UNetInputs x;
    x.sample = Variable(rows(in.sample));
    // timestep and time_ids stay f64 on the host: the UNet computes their sinusoids there
    const Tensor t = in.timestep.to(DType::F64);
    x.timestep = t.numel() == 1 ? t.reshape({1}) : t.narrow(0, i, n);
    x.encoder_hidden_states = Variable(rows(in.encoder_hidden_states));
    x.encoder_attention_mask = rows(in.encoder_attention_mask);
    if (in.text_embeds.defined()) x.text_embeds = Variable(rows(in.text_embeds));
    if (in.time_ids.defined()) x.time_ids = in.time_ids.to(DType::F64).narrow(0, i, n);
    outs.push_back(model->forward(x).tensor().to(DType::F32).to(Device::cpu()));
  }
  result.output = outs.size() == 1 ? outs[0] : ops::cat(outs, 0);
  for (double v : result.output.to_vector())
    if (!std::isfinite(v)) throw NumericalError("run: the UNet's output holds NaN or Inf");
  return result;
}

}  // namespace loom::trainer
