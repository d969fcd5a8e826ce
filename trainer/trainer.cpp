#include "trainer/trainer.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iomanip>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <sstream>

#include "adapters/custom_diffusion.h"
#include "adapters/lora.h"
#include "autograd/ops.h"
#include "io/adapter_io.h"
#include "io/checkpoint.h"
#include "nn/norm.h"
#include "optim/optim.h"
#include "tensor/ops.h"
#include "nn/linear.h"
#include "tensor/device_timer.h"
#include "trainer/out_dir.h"
#include "trainer/plot.h"
#include "trainer/step_graph.h"

namespace loom::trainer {

using nlohmann::json;

// Keys of the f16 loss scaler's state (optim::GradScaler::state_dict) in a checkpoint's optimizer group.
constexpr const char* kScalerPrefix = "grad_scaler.";

// ---- data -----------------------------------------------------------------------------------

namespace {

Tensor take(const io::TensorFile& f, const std::string& path, const std::string& key, int64_t rank, bool required,
            DType dtype) {
  const Tensor* t = f.find(key);
  if (!t) {
    if (required) throw io::FileError(path, "missing tensor '" + key + "'");
    return Tensor();
  }
  if (t->dim() != rank) {
    std::ostringstream os;
    os << "tensor '" << key << "' has shape " << t->shape() << ", expected " << rank << " dims";
    throw io::FileError(path, os.str());
  }
  if (!io::all_finite(*t)) throw io::FileError(path, "tensor '" + key + "' holds NaN or Inf values");
  return t->to(dtype);
}

void check_rows(const std::string& path, const std::string& key, const Tensor& t, int64_t n) {
  if (t.defined() && t.size(0) != n) {
    std::ostringstream os;
    os << "tensor '" << key << "' has " << t.size(0) << " samples, hidden_states has " << n;
    throw io::FileError(path, os.str());
  }
}

Tensor gather(const Tensor& t, const std::vector<int64_t>& indices) {
  if (!t.defined()) return t;
  std::vector<Tensor> rows;
  for (int64_t i : indices) rows.push_back(t.narrow(0, i, 1));
  return ops::cat(rows, 0);
}

}  // namespace

DataSet DataSet::load(const std::string& path, bool need_target, DType dtype) {
  const io::TensorFile f = io::read_tensor_file(path);
  DataSet d;
  d.hidden_states = take(f, path, "hidden_states", 4, true, dtype);
  d.encoder_hidden_states = take(f, path, "encoder_hidden_states", 3, false, dtype);
  d.encoder_attention_mask = take(f, path, "encoder_attention_mask", 2, false, dtype);
  d.target = take(f, path, "target", 4, need_target, dtype);
  const int64_t n = d.size();
  if (n == 0) throw io::FileError(path, "hidden_states holds no samples");
  check_rows(path, "encoder_hidden_states", d.encoder_hidden_states, n);
  check_rows(path, "encoder_attention_mask", d.encoder_attention_mask, n);
  check_rows(path, "target", d.target, n);
  if (d.target.defined() && d.target.shape() != d.hidden_states.shape()) {
    std::ostringstream os;
    os << "target " << d.target.shape() << " differs in shape from hidden_states " << d.hidden_states.shape();
    throw io::FileError(path, os.str());
  }
  if (d.encoder_attention_mask.defined() &&
      (!d.encoder_hidden_states.defined() || d.encoder_attention_mask.size(1) != d.encoder_hidden_states.size(1)))
    throw io::FileError(path, "encoder_attention_mask must be (N, K) with K the length of encoder_hidden_states");
  return d;
}

void DataSet::check_fits(const attention::Transformer2DConfig& config, const std::string& path) const {
  auto fail = [&](const std::string& what) { throw io::FileError(path, what); };
  if (hidden_states.size(1) != config.in_channels)
    fail("tensor 'hidden_states' has " + std::to_string(hidden_states.size(1)) + " channels, the model's in_channels is " +
         std::to_string(config.in_channels));
  if (encoder_hidden_states.defined() && config.cross_attention_dim &&
      encoder_hidden_states.size(2) != *config.cross_attention_dim)
    fail("tensor 'encoder_hidden_states' has width " + std::to_string(encoder_hidden_states.size(2)) +
         ", the model's cross_attention_dim is " + std::to_string(*config.cross_attention_dim));
  if (!encoder_hidden_states.defined() && config.cross_attention_dim && *config.cross_attention_dim != config.inner_dim())
    fail("missing tensor 'encoder_hidden_states': the model has cross-attention (cross_attention_dim " +
         std::to_string(*config.cross_attention_dim) + ")");
  if (encoder_hidden_states.defined() && !config.cross_attention_dim)
    fail("tensor 'encoder_hidden_states' is given but the model has no cross-attention (no cross_attention_dim)");
}

DataSet DataSet::rows(const std::vector<int64_t>& indices) const {
  return {gather(hidden_states, indices), gather(encoder_hidden_states, indices),
          gather(encoder_attention_mask, indices), gather(target, indices)};
}

// ---- options --------------------------------------------------------------------------------

std::string TrainOptions::to_json() const {
  json j{{"adapter", adapter},     {"rank", rank},         {"targets", targets},
         {"train_q_out", train_q_out}, {"optimizer", optimizer}, {"lr", lr},
         {"steps", steps},         {"schedule_steps", schedule_steps}, {"batch_size", batch_size},
         {"grad_accum", grad_accum},
         {"seed", seed},           {"scheduler", scheduler}, {"warmup_steps", warmup_steps},
         {"max_grad_norm", max_grad_norm}, {"checkpoint_every", checkpoint_every},
         {"init_adapter", init_adapter}, {"prefix", prefix}, {"out_dir", out_dir}};
  j["alpha"] = alpha ? json(*alpha) : json(nullptr);
  j["device"] = device;
  j["precision"] = precision;
  j["save_dtype"] = save_dtype;
  j["weight_decay"] = weight_decay ? json(*weight_decay) : json(nullptr);
  j["diffusion"] = json::parse(diffusion.to_json());
  return j.dump(2);
}

TrainOptions TrainOptions::from_json(const std::string& text) {
  TrainOptions o;
  try {
    const json j = json::parse(text);
    o.adapter = j.at("adapter"), o.rank = j.at("rank"), o.targets = j.at("targets").get<std::vector<std::string>>();
    o.train_q_out = j.at("train_q_out"), o.optimizer = j.at("optimizer"), o.lr = j.at("lr");
    o.steps = j.at("steps"), o.batch_size = j.at("batch_size"), o.grad_accum = j.at("grad_accum");
    o.seed = j.at("seed"), o.scheduler = j.at("scheduler"), o.warmup_steps = j.at("warmup_steps");
    o.max_grad_norm = j.at("max_grad_norm"), o.checkpoint_every = j.at("checkpoint_every");
    o.init_adapter = j.at("init_adapter"), o.prefix = j.at("prefix"), o.out_dir = j.at("out_dir");
    if (j.contains("schedule_steps")) o.schedule_steps = j.at("schedule_steps");  // absent before 0.1.1
    if (!j.at("alpha").is_null()) o.alpha = j.at("alpha").get<double>();
    o.device = j.value("device", std::string("cpu"));  // checkpoints of earlier versions: the CPU in f32
    o.precision = j.value("precision", std::string("f32"));
    o.save_dtype = j.value("save_dtype", std::string("f32"));  // checkpoints of earlier versions: f32
    if (!j.at("weight_decay").is_null()) o.weight_decay = j.at("weight_decay").get<double>();
    if (j.contains("diffusion")) o.diffusion = DiffusionOptions::from_json(j.at("diffusion").dump());  // a UNet run
  } catch (const json::exception& e) {
    LOOM_FAIL("training options: ", e.what());
  }
  return o;
}

void TrainOptions::validate() const {
  LOOM_CHECK(adapter == "lora" || adapter == "custom_diffusion", "--adapter must be lora or custom_diffusion, got '",
             adapter, "'");
  LOOM_CHECK(rank > 0, "--rank must be positive, got ", rank);
  LOOM_CHECK(save_dtype == "f32" || save_dtype == "bf16" || save_dtype == "f16",
             "--save-dtype must be f32, bf16 or f16, got '", save_dtype, "'");
  LOOM_CHECK(save_dtype == "f32" || adapter == "lora", "--save-dtype ", save_dtype,
             " is for LoRA adapters; a Custom Diffusion adapter is saved in f32");
  LOOM_CHECK(!alpha || (std::isfinite(*alpha) && *alpha > 0), "--alpha must be a positive number");
  LOOM_CHECK(std::isfinite(lr) && lr > 0, "--lr must be a positive number, got ", lr);
  LOOM_CHECK(steps > 0, "--steps must be positive, got ", steps);
  LOOM_CHECK(batch_size > 0, "--batch-size must be positive, got ", batch_size);
  LOOM_CHECK(grad_accum > 0, "--grad-accum must be positive, got ", grad_accum);
  LOOM_CHECK(warmup_steps >= 0, "--warmup-steps must be ≥ 0, got ", warmup_steps);
  LOOM_CHECK(max_grad_norm >= 0, "--max-grad-norm must be ≥ 0, got ", max_grad_norm);
  LOOM_CHECK(checkpoint_every >= 0, "--checkpoint-every must be ≥ 0, got ", checkpoint_every);
  LOOM_CHECK(!out_dir.empty(), "--out must not be empty");
  LOOM_CHECK(!targets.empty(), "--targets must name at least one module");
  LOOM_CHECK(schedule_steps >= 0, "schedule_steps must be ≥ 0, got ", schedule_steps);
  optim::make_schedule(scheduler, warmup_steps, steps);  // throws naming an unknown scheduler
  bool known = false;
  for (const auto& n : optim::optimizer_names()) known = known || n == optimizer;
  LOOM_CHECK(known, "--optimizer must be sgd, adam or adamw, got '", optimizer, "'");
  if (diffusion.enabled) diffusion.validate();
}

// ---- device and precision ---------------------------------------------------------------------

std::string Placement::describe() const {
  std::string s = std::string("device ") + device.str() + ", precision " + precision_name(precision);
  switch (precision) {
    case Precision::BF16:
    case Precision::F16:
      return s + " (weights and activations " + precision_name(precision) +
             "; adapter weights, gradients and optimizer state f32)";
    case Precision::TF32: return s + " (f32 storage, TF32 tensor-core GEMMs)";
    default: return s;
  }
}

Placement placement_of(const std::string& device, const std::string& precision) {
  Placement p;
  p.device = parse_device(device.empty() ? "auto" : device);
  p.precision = precision.empty() ? default_precision(p.device) : parse_precision(precision);
  return p;
}

void place_model(nn::Module& model, const Placement& where) {
  // Cast where the weights are, then move: a bf16 model never passes through f32 device blocks
  // (which the caching allocator would keep and hand out twice too large).
  model.to(storage_dtype(where.precision));
  model.to(where.device);
  set_allow_tf32(where.precision == Precision::TF32);
}

// ---- files ----------------------------------------------------------------------------------

void write_loss_files(const std::string& dir, const std::vector<double>& losses) {
  std::ostringstream csv;
  csv << "step,loss\n" << std::setprecision(17);
  for (size_t i = 0; i < losses.size(); ++i) csv << i + 1 << "," << losses[i] << "\n";
  io::write_file_atomic(dir + "/loss.csv", csv.str());
  io::write_file_atomic(dir + "/loss.png", render_loss_png(losses));
}

void make_dirs(const std::string& dir) {
  std::string partial;
  std::stringstream ss(dir);
  if (!dir.empty() && dir[0] == '/') partial = "/";
  for (std::string part; std::getline(ss, part, '/');) {
    if (part.empty()) continue;
    partial += part + "/";
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
      throw io::FileError(dir, std::string("cannot create the output directory (") + std::strerror(errno) + ")");
  }
}

namespace {

// The adapter under training and its named parameters.
// `trained` with its weights in `dtype` (on the host), for a file saved in that dtype; the
// trained adapter itself when the dtypes already agree.
adapters::LoraAdapter adapter_in_dtype(const adapters::LoraAdapter& trained, DType dtype) {
  adapters::LoraAdapter copy(trained.name());
  for (const auto& [path, m] : trained.modules()) {
    adapters::LoraModule c = m;
    if (m.down.dtype() != dtype) c.down = Variable(m.down.tensor().to(Device::cpu()).to(dtype));
    if (m.up.dtype() != dtype) c.up = Variable(m.up.tensor().to(Device::cpu()).to(dtype));
    copy.add_module(path, std::move(c));
  }
  return copy;
}

struct Adapter {
  std::shared_ptr<adapters::LoraSet> lora;
  std::vector<std::pair<std::string, Variable>> params;
};

Adapter make_adapter(const std::shared_ptr<nn::Module>& model, const TrainOptions& o,
                     bool load_init) {
  Adapter a;
  io::AdapterLoadOptions lo;
  lo.prefix = o.prefix;
  if (o.adapter == "lora") {
    a.lora = std::make_shared<adapters::LoraSet>(model);
    if (load_init && !o.init_adapter.empty()) {
      io::load_lora(*a.lora, "default", o.init_adapter, lo);
      for (const auto& [path, m] : a.lora->adapter("default").modules())
        if (!m.plain())
          throw OptionError("--init-adapter " + o.init_adapter + ": module '" + path + "' is a " +
                            adapters::module_kind_name(m.kind) + (m.magnitude.defined() ? " with DoRA" : "") +
                            "; loom trains plain LoRA only (LoHa, LoKr and DoRA files can be run, fused and "
                            "converted, not trained)");
    } else {
      adapters::LoraConfig cfg;
      cfg.rank = o.rank, cfg.alpha = o.alpha, cfg.targets = o.targets;
      Generator init(o.seed * 0x9e3779b97f4a7c15ull + 1);
      a.lora->add("default", cfg, init);
    }
    a.params = a.lora->trainable_parameters();
  } else {
    if (load_init && !o.init_adapter.empty()) {
      io::load_custom_diffusion(*model, o.init_adapter, lo);
      for (const auto& [name, p] : model->named_parameters())
        if (name.find("_custom_diffusion") != std::string::npos) a.params.emplace_back(name, p);
    } else {
      a.params = adapters::apply_custom_diffusion(*model, o.train_q_out ? "crossattn" : "crossattn_kv");
    }
  }
  return a;
}

// Sample indices of optimizer micro-batch `micro`: epochs are seeded permutations of the data,
// so the order depends only on (seed, step), never on earlier runs of the process.
class Sampler {
 public:
  Sampler(int64_t n, int64_t batch, uint64_t seed) : n_(n), batch_(batch), seed_(seed) {}
  std::vector<int64_t> batch(int64_t micro) {
    std::vector<int64_t> out;
    for (int64_t c = micro * batch_; c < (micro + 1) * batch_; ++c) out.push_back(permutation(c / n_)[size_t(c % n_)]);
    return out;
  }

 private:
  const std::vector<int64_t>& permutation(int64_t epoch) {
    if (epoch != epoch_) {
      Generator g(seed_ * 0xbf58476d1ce4e5b9ull + uint64_t(epoch) + 17);
      perm_.resize(size_t(n_));
      for (int64_t i = 0; i < n_; ++i) perm_[size_t(i)] = i;
      for (int64_t i = n_ - 1; i > 0; --i) std::swap(perm_[size_t(i)], perm_[size_t(g.uniform() * double(i + 1))]);
      epoch_ = epoch;
    }
    return perm_;
  }
  int64_t n_, batch_;
  uint64_t seed_;
  int64_t epoch_ = -1;
  std::vector<int64_t> perm_;
};

std::string format_eta(double seconds) {
  const int64_t s = int64_t(std::max(0.0, seconds) + 0.5);
  std::ostringstream os;
  os << s / 60 << ":" << std::setw(2) << std::setfill('0') << s % 60;
  return os.str();
}

// Every LoRA target module must allow the rank: rank ≤ min(in_features, out_features). The
// message names the module with the smallest limit.
void check_rank_fits(const nn::Module& model, const TrainOptions& o) {
  std::string tightest;
  int64_t limit = std::numeric_limits<int64_t>::max(), in = 0, out = 0;
  for (const auto& [path, module] : model.named_modules()) {
    const auto linear = std::dynamic_pointer_cast<nn::Linear>(module);
    if (!linear) continue;
    const bool targeted = std::any_of(o.targets.begin(), o.targets.end(), [&, p = path](const std::string& t) {
      return p == t || (p.size() > t.size() && p.compare(p.size() - t.size(), t.size(), t) == 0 &&
                        p[p.size() - t.size() - 1] == '.');
    });
    if (targeted && std::min(linear->in_features(), linear->out_features()) < limit) {
      limit = std::min(linear->in_features(), linear->out_features());
      tightest = path, in = linear->in_features(), out = linear->out_features();
    }
  }
  if (!tightest.empty() && o.rank > limit)
    throw OptionError("--rank " + std::to_string(o.rank) + " is larger than the module '" + tightest + "' allows (" +
                      std::to_string(out) + "x" + std::to_string(in) + ": rank ≤ " + std::to_string(limit) + ")");
}

// A resume continues the planned run (see train() in trainer.h): sets o.steps from `steps`
// (0: the plan) and keeps the schedule's planned length.
void continue_plan(TrainOptions& o, int64_t steps, int64_t done, const std::string& dir, std::ostream& log) {
  const int64_t planned = o.steps;
  if (o.schedule_steps == 0) o.schedule_steps = planned;
  if (steps > 0) o.steps = steps;
  if (o.steps <= done)
    throw OptionError("--steps " + std::to_string(o.steps) + ": the run in " + dir + " is at step " +
                      std::to_string(done) + " already (planned: " + std::to_string(planned) +
                      " steps); give a larger --steps to extend it");
  if (o.steps > planned) {
    log << "loom: extending the run in " << dir << " from " << planned << " to " << o.steps << " steps: ";
    if (o.scheduler == "linear" || o.scheduler == "cosine")
      log << "the " << o.scheduler << " schedule keeps its planned length of " << o.schedule_steps
          << " steps; steps " << o.schedule_steps + 1 << ".." << o.steps << " hold its final learning rate\n";
    else
      log << "the " << o.scheduler << " schedule continues (the LR of a run planned for " << o.steps << " steps)\n";
  }
}

}  // namespace

// ---- the loop ----------------------------------------------------------------------------------

TrainResult train(const std::shared_ptr<attention::Transformer2DModel>& model, const DataSet& data,
                  const TrainOptions& given, std::ostream& log, const std::string& resume_dir) {
  LOOM_CHECK(data.target.defined(), "train: the data has no 'target'");
  // stage: the rows on the CPU (copied to the device by the trainer); loss: device work only.
  const MakeBatchLoss mse_to_target = [&](const TrainOptions&, const Placement& where) -> BatchObjective {
    const DType act = storage_dtype(where.precision);
    BatchObjective objective;
    objective.stage = [&data](const std::vector<int64_t>& indices, int64_t) {
      const DataSet b = data.rows(indices);
      return std::vector<Tensor>{b.hidden_states, b.encoder_hidden_states, b.encoder_attention_mask, b.target};
    };
    objective.loss = [&model, act](const std::vector<Tensor>& in) {
      auto cast = [&](const Tensor& t) { return t.defined() ? t.to(act) : t; };
      const Variable ctx = in[1].defined() ? Variable(cast(in[1])) : Variable();
      const Variable y = model->forward(Variable(cast(in[0])), ctx, cast(in[2]));
      // the loss in f32 whatever the precision (SPEC §7)
      return mse_loss(to_dtype(y, DType::F32), Variable(in[3].to(DType::F32)));
    };
    return objective;
  };
  return train_with(model, data.size(), mse_to_target, given, log, resume_dir);
}

TrainResult train_with(const std::shared_ptr<nn::Module>& model, int64_t samples, const MakeBatchLoss& objective,
                       const TrainOptions& given, std::ostream& log, const std::string& resume_dir) {
  using Clock = std::chrono::steady_clock;
  TrainOptions o = given;
  io::Checkpoint resume;
  if (!resume_dir.empty()) {
    resume = io::load_checkpoint(resume_dir + "/checkpoint.h5");
    o = TrainOptions::from_json(resume.options_json);
    o.out_dir = given.out_dir, o.quiet = given.quiet;
    o.device = given.device, o.precision = given.precision;  // a run may continue on another device
    o.cuda_graph = given.cuda_graph;
    continue_plan(o, given.steps, resume.step, resume_dir, log);
    if (o.diffusion.enabled != given.diffusion.enabled)
      throw OptionError("the checkpoint in " + resume_dir + " is of a run on a " +
                        (o.diffusion.enabled ? "UNet (diffusion objective)" : "Transformer2DModel block") +
                        "; this model is a " + (given.diffusion.enabled ? "UNet" : "Transformer2DModel block"));
  }
  o.validate();
  const Placement where = placement_of(o.device, o.precision);
  if (o.adapter == "lora" && (!resume_dir.empty() || o.init_adapter.empty())) check_rank_fits(*model, o);
  make_dirs(o.out_dir);
  const OutputDirLock lock(o.out_dir, log);
  place_model(*model, where);  // before the adapter, so that it is made on the device (f32 masters)
  reset_peak_device_memory(where.device);
  Adapter adapter = make_adapter(model, o, resume_dir.empty());
  Generator rng(o.seed);
  nn::set_dropout_generator(*model, rng);
  model->train();

  optim::OptimizerConfig oc;
  oc.lr = o.lr, oc.weight_decay = o.weight_decay;
  auto opt = optim::make_optimizer(o.optimizer, adapter.params, oc);
  const optim::LRSchedule schedule =
      optim::make_schedule(o.scheduler, o.warmup_steps, o.schedule_steps > 0 ? o.schedule_steps : o.steps);
  // Past its length a decaying schedule holds the LR of its last step (a resume that extends a run).
  const bool decays = schedule.kind() == optim::ScheduleKind::Linear || schedule.kind() == optim::ScheduleKind::Cosine;
  auto schedule_step = [&](int64_t s) { return decays ? std::min(s, schedule.total_steps() - 1) : s; };
  std::vector<Variable> params;
  for (const auto& [n, v] : adapter.params) params.push_back(v);
  // f16: dynamic loss scaling (optim/grad_scaler.h). Its state travels in the checkpoint's
  // optimizer group under kScalerPrefix (absent in checkpoints of other precisions).
  std::optional<optim::GradScaler> scaler;
  if (where.precision == Precision::F16) scaler.emplace();

  TrainResult result;
  int64_t step = 0;
  if (!resume_dir.empty()) {  // weights, optimizer, RNG, step and losses exactly as saved
    std::map<std::string, Tensor> saved(resume.adapter.begin(), resume.adapter.end());
    for (const auto& [name, v] : adapter.params) {
      auto it = saved.find(name);
      if (it == saved.end()) throw io::FileError(resume_dir + "/checkpoint.h5", "lacks adapter tensor '" + name + "'");
      v.tensor().copy_(it->second);
    }
    std::map<std::string, Tensor> state, scaler_state;
    for (const auto& [k, t] : resume.optimizer) {
      if (k.rfind(kScalerPrefix, 0) == 0) scaler_state[k.substr(std::strlen(kScalerPrefix))] = t;
      else state[k] = t.to(where.device);
    }
    opt->load_state_dict(state);
    if (scaler && !scaler_state.empty()) scaler->load_state_dict(scaler_state);  // else: a fresh scale
    if (!scaler && !scaler_state.empty())
      log << "the checkpoint's f16 loss scale is not used: precision " << precision_name(where.precision)
          << " has no loss scaling\n";
    rng.set_state(resume.rng_state);
    step = resume.step;
    result.losses = resume.losses;
  }

  // The adapter file's dtype (--save-dtype: f32 | bf16 | f16, parsed like a precision).
  const DType save_dtype = storage_dtype(parse_precision(o.save_dtype, "--save-dtype"));
  result.adapter_path = o.out_dir + "/adapter.safetensors";
  result.checkpoint_path = o.out_dir + "/checkpoint.h5";
  auto save_all = [&] {
    if (adapter.lora)
      io::save_lora(adapter_in_dtype(adapter.lora->adapter("default"), save_dtype), *model, result.adapter_path,
                    io::KeyFamily::Peft, o.prefix);
    else
      io::save_custom_diffusion(*model, result.adapter_path, o.prefix);
    io::Checkpoint c;
    c.adapter_kind = o.adapter;
    for (const auto& [n, v] : adapter.params) c.adapter.emplace_back(n, v.tensor().to(Device::cpu()));
    for (const auto& [k, t] : opt->state_dict()) c.optimizer[k] = t.to(Device::cpu());
    if (scaler)
      for (const auto& [k, t] : scaler->state_dict()) c.optimizer[kScalerPrefix + k] = t;
    c.step = step;
    c.rng_state = rng.state();
    c.options_json = o.to_json();
    c.losses = result.losses;
    io::save_checkpoint(result.checkpoint_path, c);
    write_loss_files(o.out_dir, result.losses);
  };

  Sampler sampler(samples, o.batch_size, o.seed);
  StepComputer computer(objective(o, where), where, o, params, *model, scaler ? &*scaler : nullptr, log);
  const auto start = Clock::now();
  auto last_print = start;
  const int64_t first_step = step;
  // The losses stay on the device (f32, 0-d) and are read in one go at each log interval,
  // checkpoint and the end: no host round trip inside a step. A non-finite loss found then
  // names its step; nothing is written after it (the checks run before every save).
  std::vector<Tensor> pending_losses;
  auto read_losses = [&] {
    if (pending_losses.empty()) return;
    const Tensor all = ops::cat(pending_losses, 0).to(Device::cpu());
    const int64_t first = int64_t(result.losses.size());
    const std::vector<double> values = all.to_vector();
    pending_losses.clear();
    for (size_t i = 0; i < values.size(); ++i) {
      if (!std::isfinite(values[i]))
        throw NumericalError("step " + std::to_string(first + int64_t(i) + 1) + ": the loss is not finite (" +
                             std::to_string(values[i]) + "); stopped: nothing was written after it, the files in " +
                             o.out_dir + " (if any) are unchanged");
      result.losses.push_back(values[i]);
    }
  };
  auto check_weights = [&] {
    read_losses();
    for (const auto& [name, v] : adapter.params)
      if (!io::all_finite(v.tensor()))
        throw NumericalError("step " + std::to_string(step) + ": the loss was finite (" +
                             std::to_string(result.losses.back()) + ") but the optimizer step left NaN or Inf in '" +
                             name + "' (learning rate too large?); stopped: nothing was written for this step, the files in " +
                             o.out_dir + " (if any) are unchanged");
  };
  for (; step < o.steps;) {
    schedule.apply(*opt, schedule_step(step), o.lr);
    opt->zero_grad();
    const Tensor loss_sum =
        computer.run(step, step - first_step, [&sampler](int64_t micro) { return sampler.batch(micro); });
    pending_losses.push_back(loss_sum.reshape({1}));
    // f16: the gradients are unscaled and checked in one fused op; its flag is read here, once per
    // step (4 bytes), because skipping the optimizer step is decided on the host. A skipped step
    // leaves weights and optimizer state as they were and still counts as a step (data, schedule).
    const double scale_before = scaler ? scaler->scale() : 1.0;
    const bool skip = scaler && scaler->unscale(params);
    if (skip) {
      scaler->update(true);
      log << "step " << step + 1 << ": the gradients hold inf or nan at loss scale " << scale_before
          << "; the optimizer step is skipped, loss scale now " << scaler->scale() << "\n";
    } else {
      if (o.max_grad_norm > 0) {  // the norm is read on the host: one small read per step, only when clipping
        const double norm = optim::clip_grad_norm(params, o.max_grad_norm);
        if (!std::isfinite(norm)) {
          read_losses();  // a non-finite loss is the better message when there is one
          throw NumericalError("step " + std::to_string(step + 1) +
                               ": the gradients hold NaN or Inf; stopped: nothing was written for this step, the "
                               "files in " + o.out_dir + " (if any) are unchanged");
        }
      }
      opt->step();
      if (scaler) scaler->update(false);
    }
    ++step;
    // Non-finite adapter weights after a finite loss: checked every step on the CPU, and on a GPU
    // wherever the losses are read (no host round trip inside a step there).
    if (where.device.is_cpu()) check_weights();
    const auto now = Clock::now();
    const bool log_now = !o.quiet && (std::chrono::duration<double>(now - last_print).count() >= 1.0 ||
                                      step == o.steps || step == first_step + 1);
    if (log_now || step == o.steps || (o.checkpoint_every > 0 && step % o.checkpoint_every == 0)) check_weights();
    if (log_now) {
      const double loss_now = result.losses.back();
      const double elapsed = std::chrono::duration<double>(now - start).count();
      const double rate = double(step - first_step) / std::max(elapsed, 1e-9);
      log << "step " << step << "/" << o.steps << "  loss " << std::scientific << std::setprecision(4) << loss_now
          << std::defaultfloat << "  " << std::fixed << std::setprecision(1) << rate << " it/s  ETA "
          << format_eta(double(o.steps - step) / rate) << std::defaultfloat << "\n";
      last_print = now;
    }
    if (o.checkpoint_every > 0 && step % o.checkpoint_every == 0 && step < o.steps) save_all();
  }
  check_weights();
  save_all();
  model->eval();
  result.peak_device_bytes = device_memory(where.device).peak;
  result.graph_replays = computer.replays();
  result.lora = adapter.lora;
  result.steps = step;
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

}  // namespace loom::trainer
