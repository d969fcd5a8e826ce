#include "trainer/diffusion_objective.h"

#include <cmath>
#include <sstream>

#include "autograd/ops.h"
#include "io/adapter_io.h"
#include "io/tensor_file.h"
#include "tensor/ops.h"
#include "trainer/diffusion_noise.h"

namespace loom::trainer {

// ---- data -----------------------------------------------------------------------------------

namespace {

std::string shape_text(const Tensor& t) {
  std::ostringstream os;
  os << t.shape();
  return os.str();
}

// The tensor `key` of the file with `rank` dims, finite, converted to `dtype` (undefined when
// absent and not required).
Tensor read_tensor(const io::TensorFile& f, const std::string& path, const std::string& key, int64_t rank,
                   bool required, DType dtype = DType::F32) {
  const Tensor* t = f.find(key);
  if (!t) {
    if (required) throw io::FileError(path, "missing tensor '" + key + "'");
    return Tensor();
  }
  if (t->dim() != rank)
    throw io::FileError(path, "tensor '" + key + "' has shape " + shape_text(*t) + ", expected " +
                                  std::to_string(rank) + " dims");
  if (!io::all_finite(*t)) throw io::FileError(path, "tensor '" + key + "' holds NaN or Inf values");
  return t->to(dtype);
}

Tensor gather_rows(const Tensor& t, const std::vector<int64_t>& indices) {
  if (!t.defined()) return t;
  std::vector<Tensor> rows;
  for (int64_t i : indices) rows.push_back(t.narrow(0, i, 1));
  return rows.size() == 1 ? rows[0].contiguous() : ops::cat(rows, 0);
}

}  // namespace

DiffusionData DiffusionData::load(const std::string& path) {
  const io::TensorFile f = io::read_tensor_file(path);
  DiffusionData d;
  d.latents = read_tensor(f, path, "latents", 4, true);
  d.encoder_hidden_states = read_tensor(f, path, "encoder_hidden_states", 3, true);
  d.encoder_attention_mask = read_tensor(f, path, "encoder_attention_mask", 2, false);
  d.text_embeds = read_tensor(f, path, "text_embeds", 2, false);
  d.time_ids = read_tensor(f, path, "time_ids", 2, false);
  d.noise = read_tensor(f, path, "noise", 4, false);
  d.timesteps = read_tensor(f, path, "timesteps", 1, false, DType::F64);
  const int64_t n = d.size();
  if (n == 0) throw io::FileError(path, "tensor 'latents' holds no samples");
  const std::pair<const char*, const Tensor*> per_sample[] = {
      {"encoder_hidden_states", &d.encoder_hidden_states}, {"encoder_attention_mask", &d.encoder_attention_mask},
      {"text_embeds", &d.text_embeds}, {"time_ids", &d.time_ids}, {"noise", &d.noise}, {"timesteps", &d.timesteps}};
  for (const auto& [key, t] : per_sample)
    if (t->defined() && t->size(0) != n)
      throw io::FileError(path, std::string("tensor '") + key + "' has " + std::to_string(t->size(0)) +
                                    " samples, latents has " + std::to_string(n));
  if (d.noise.defined() && d.noise.shape() != d.latents.shape())
    throw io::FileError(path, "tensor 'noise' has shape " + shape_text(d.noise) + ", latents has " +
                                  shape_text(d.latents));
  if (d.encoder_attention_mask.defined() && d.encoder_attention_mask.size(1) != d.encoder_hidden_states.size(1))
    throw io::FileError(path, "tensor 'encoder_attention_mask' has shape " + shape_text(d.encoder_attention_mask) +
                                  ": it must be (N, K) with K = " + std::to_string(d.encoder_hidden_states.size(1)) +
                                  ", the length of encoder_hidden_states");
  if (d.text_embeds.defined() != d.time_ids.defined())
    throw io::FileError(path, std::string("tensor '") + (d.text_embeds.defined() ? "time_ids" : "text_embeds") +
                                  "' is missing: SDXL conditioning needs both text_embeds and time_ids");
  return d;
}

void DiffusionData::check_fits(const unet::UNet2DConditionConfig& c, const DiffusionOptions& o,
                               const std::string& path) const {
  auto fail = [&](const std::string& what) { throw io::FileError(path, what); };
  if (latents.size(1) != c.in_channels)
    fail("tensor 'latents' has " + std::to_string(latents.size(1)) + " channels, the UNet's in_channels is " +
         std::to_string(c.in_channels));
  if (c.in_channels != c.out_channels)
    fail("the UNet's out_channels (" + std::to_string(c.out_channels) + ") differ from in_channels (" +
         std::to_string(c.in_channels) + "): the prediction cannot be compared with the noise");
  const int64_t cad = c.cross_attention_dim.empty() ? 0 : c.cross_attention_dim.front();
  if (cad && encoder_hidden_states.size(2) != cad)
    fail("tensor 'encoder_hidden_states' has width " + std::to_string(encoder_hidden_states.size(2)) +
         ", the UNet's cross_attention_dim is " + std::to_string(cad));
  const bool text_time = c.addition_embed_type == "text_time";
  if (text_time && !text_embeds.defined())
    fail("missing tensor 'text_embeds' (and 'time_ids'): the UNet has addition_embed_type \"text_time\" (SDXL)");
  if (!text_time && text_embeds.defined())
    fail("tensor 'text_embeds' is given but the UNet has no text_time embedding (addition_embed_type is not "
         "\"text_time\")");
  if (text_time && text_embeds.size(1) != c.text_embeds_dim())
    fail("tensor 'text_embeds' has width " + std::to_string(text_embeds.size(1)) + ", the UNet expects " +
         std::to_string(c.text_embeds_dim()) + " (projection_class_embeddings_input_dim − 6·addition_time_embed_dim)");
  if (text_time && time_ids.size(1) != 6)
    fail("tensor 'time_ids' has shape " + shape_text(time_ids) + ", expected (N, 6)");
  if (timesteps.defined())
    for (double t : timesteps.to_vector())
      if (t != std::floor(t) || t < 0 || t >= double(o.schedule.num_train_timesteps)) {
        std::ostringstream os;
        os << "tensor 'timesteps' holds " << t << ": timesteps must be integers in [0, "
           << o.schedule.num_train_timesteps << ") (--num-train-timesteps)";
        fail(os.str());
      }
}

DiffusionData DiffusionData::rows(const std::vector<int64_t>& indices) const {
  DiffusionData d;
  d.latents = gather_rows(latents, indices);
  d.encoder_hidden_states = gather_rows(encoder_hidden_states, indices);
  d.encoder_attention_mask = gather_rows(encoder_attention_mask, indices);
  d.text_embeds = gather_rows(text_embeds, indices);
  d.time_ids = gather_rows(time_ids, indices);
  d.noise = gather_rows(noise, indices);
  d.timesteps = gather_rows(timesteps, indices);
  return d;
}

// ---- the loss ---------------------------------------------------------------------------------

Variable diffusion_loss(const unet::UNet2DConditionModel& model, const unet::DDPMSchedule& schedule,
                        const DiffusionBatch& b, const std::optional<double>& snr_gamma, DType model_dtype) {
  auto cast = [&](const Tensor& t) { return t.defined() ? t.to(model_dtype) : t; };
  const Tensor noisy = schedule.add_noise(b.latents, b.noise, b.timesteps);
  const Tensor target = schedule.target(b.latents, b.noise, b.timesteps);
  unet::UNetInputs in;
  in.sample = Variable(cast(noisy));
  in.timestep = b.timesteps;
  in.encoder_hidden_states = Variable(cast(b.encoder_hidden_states));
  in.encoder_attention_mask = cast(b.encoder_attention_mask);
  if (b.text_embeds.defined()) in.text_embeds = Variable(cast(b.text_embeds));
  in.time_ids = cast(b.time_ids);
  const Variable pred = to_dtype(model.forward(in), b.latents.dtype());  // the loss in f32 or wider (SPEC §7)
  const std::vector<double> weights =
      snr_gamma ? schedule.min_snr_weights(b.timesteps, *snr_gamma, b.latents.dtype() == DType::F64 ? DType::F64 : DType::F32)
                : std::vector<double>{};
  return unet::weighted_mse_loss(pred, Variable(target), weights);
}

// ---- training ---------------------------------------------------------------------------------

TrainResult train_unet(const std::shared_ptr<unet::UNet2DConditionModel>& model, const DiffusionData& data,
                       const TrainOptions& options, std::ostream& log, const std::string& resume_dir) {
  LOOM_CHECK(options.diffusion.enabled, "train_unet: options.diffusion.enabled is not set");
  // stage: rows, noise and timesteps drawn, the noisy latents and the target (device work with
  // the schedule's per-sample factors from the host), the sinusoidal time projections and the
  // min-SNR weights (host); loss: the UNet and the weighted MSE, device work only. The same
  // operations as diffusion_loss(), in the same order.
  enum Input { kNoisy, kTarget, kTimestepProj, kTimeIdsProj, kContext, kMask, kTextEmbeds, kWeights, kInputs };
  const MakeBatchLoss objective = [&data, &model](const TrainOptions& o, const Placement& where) -> BatchObjective {
    auto schedule = std::make_shared<const unet::DDPMSchedule>(o.diffusion.schedule);
    const DType act = storage_dtype(where.precision);
    BatchObjective objective;
    objective.stage = [&data, &model, schedule, o, where, act](const std::vector<int64_t>& indices, int64_t micro) {
      const DiffusionData rows = data.rows(indices);
      DiffusionDraw drawn;
      if (!rows.noise.defined() || !rows.timesteps.defined())
        drawn = draw_noise(rows.latents.shape(), o.diffusion.schedule.num_train_timesteps, o.diffusion.noise_offset,
                           o.seed, micro, where.device);
      const Tensor latents = rows.latents.to(where.device);
      const Tensor noise = rows.noise.defined() ? rows.noise.to(where.device) : drawn.noise;
      const Tensor timesteps = rows.timesteps.defined() ? rows.timesteps : drawn.timesteps;
      std::vector<Tensor> in(kInputs);
      in[kNoisy] = schedule->add_noise(latents, noise, timesteps);
      in[kTarget] = schedule->target(latents, noise, timesteps);
      unet::UNetInputs t;
      t.timestep = timesteps;
      if (rows.time_ids.defined()) t.time_ids = rows.time_ids.to(act);  // the values the model's dtype holds
      model->project_timesteps(t, latents.size(0), act, Device::cpu());
      in[kTimestepProj] = t.timestep_proj, in[kTimeIdsProj] = t.time_ids_proj;
      in[kContext] = rows.encoder_hidden_states, in[kMask] = rows.encoder_attention_mask;
      in[kTextEmbeds] = rows.text_embeds;
      if (o.diffusion.snr_gamma)
        in[kWeights] = Tensor::from_values(schedule->min_snr_weights(timesteps, *o.diffusion.snr_gamma, DType::F32),
                                           {latents.size(0)}, DType::F32);
      return in;
    };
    objective.loss = [&model, act](const std::vector<Tensor>& in) {
      auto cast = [&](const Tensor& t) { return t.defined() ? t.to(act) : t; };
      unet::UNetInputs u;
      u.sample = Variable(cast(in[kNoisy]));
      u.timestep_proj = in[kTimestepProj], u.time_ids_proj = in[kTimeIdsProj];
      u.encoder_hidden_states = Variable(cast(in[kContext]));
      u.encoder_attention_mask = cast(in[kMask]);
      if (in[kTextEmbeds].defined()) u.text_embeds = Variable(cast(in[kTextEmbeds]));
      const Variable pred = to_dtype(model->forward(u), DType::F32);  // the loss in f32 (SPEC §7)
      return unet::sample_weighted_mse_loss(pred, Variable(in[kTarget]), in[kWeights]);
    };
    return objective;
  };
  return train_with(model, data.size(), objective, options, log, resume_dir);
}

}  // namespace loom::trainer
