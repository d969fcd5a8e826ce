// The `loom` command line (SPEC §6): train, run, sample (examples/cli_sample.cpp), decode / encode
// (examples/loom_vae.cpp), extract / resize (SPEC §9, examples/cli_extract.cpp), inspect, convert, gradcheck.
// Exit codes: 0 ok, 1 a self-check of the built-in task failed, 2 usage (a bad flag, or an
// --out in use by another run), 3 bad or missing input file (also: out of memory, any other
// unexpected error), 4 numerical failure (non-finite loss, weights or output).
#include <CLI/CLI.hpp>
#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <new>
#include <sstream>
#include <stdexcept>

#include "examples/cli_common.h"
#include "examples/cli_extract.h"
#include "examples/cli_inspect.h"
#include "examples/cli_sample.h"
#include "examples/loom_vae.h"
#include "io/adapter_io.h"
#include "io/temp_files.h"
#include "trainer/builtin_task.h"
#include "trainer/builtin_unet.h"
#include "trainer/diffusion_objective.h"
#include "trainer/run.h"
#include "trainer/run_unet.h"
#include "trainer/trainer.h"
#include "unet/unet_io.h"

namespace {

using namespace loom;

using cli::UsageError;
using cli::placement_line;

// What the program is doing, for the message of an out-of-memory error ("while …").
std::string g_doing = "starting";

// Sets g_doing for its scope. Test hook: LOOM_TEST_FAULT=bad_alloc | logic_error makes the
// first phase throw that exception, so tests can check how main reports it.
class Doing {
 public:
  explicit Doing(std::string what) : previous_(g_doing) {
    g_doing = std::move(what);
    if (const char* fault = std::getenv("LOOM_TEST_FAULT"); fault && !fault_raised_) {
      fault_raised_ = true;
      if (std::string(fault) == "bad_alloc") throw std::bad_alloc();
      if (std::string(fault) == "logic_error") throw std::logic_error("test fault (LOOM_TEST_FAULT)");
    }
  }
  ~Doing() { g_doing = previous_; }

 private:
  std::string previous_;
  static inline bool fault_raised_ = false;
};

// True when both paths name the same existing file (compared by device and inode, so that
// different spellings of one path match).
bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {}, sb {};
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// A config.json that is a directory is reported as such (io::load_model_dir would call it missing).
void check_config_is_a_file(const std::string& model_dir) {
  struct stat st {};
  const std::string path = model_dir + "/config.json";
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode))
    throw io::FileError(path, "is a directory, not a config file (expected diffusers' config.json)");
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// ---- device and precision (SPEC §7) -------------------------------------------------------------

void add_placement_flags(CLI::App* cmd, std::string& device, std::string& precision, bool& deterministic) {
  device = "auto";
  cmd->add_option("--device", device, "cpu | cuda | cuda:N | auto (cuda:0 when a GPU is usable, else cpu)")
      ->capture_default_str();
  cmd->add_option("--precision", precision,
                  "f32 | tf32 | bf16 | f16 (default: bf16 on CUDA, f32 on the CPU; bf16/f16 keep the adapter, "
                  "its gradients and the optimizer state in f32)");
  cmd->add_flag("--deterministic", deterministic,
                "Bit-for-bit repeatable runs on CUDA (the CPU always is): kernels whose sums do not depend on "
                "scheduling (the attention backward without atomics, f32 attention without TF32, no timed GEMM "
                "algorithms); slower");
}

// Checks --device / --precision (a usage error names the flag), applies --deterministic and says
// the choice on stderr, as the run's first line.
trainer::Placement announce_placement(const std::string& device, const std::string& precision, bool deterministic) {
  trainer::Placement p;
  try {
    p = trainer::placement_of(device, precision);
  } catch (const Error& e) {
    throw UsageError(e.what());
  }
  std::cerr << placement_line(p, deterministic) << "\n";
  return p;
}

// ---- train -------------------------------------------------------------------------------------

struct TrainArgs {
  std::string model, data, resume, targets = "to_q,to_k,to_v,to_out.0";
  std::string config, builtin = "block";  // --config: of a single-file UNet checkpoint
  trainer::TrainOptions options;
  double alpha = 0, snr_gamma = 0;
  bool no_cuda_graph = false, deterministic = false;
  bool builtin_flags_only() const { return model.empty() && data.empty() && resume.empty(); }
};

// The diffusion objective's flags (a UNet --model; SPEC §8).
void add_diffusion_flags(CLI::App* t, TrainArgs& a) {
  auto& d = a.options.diffusion;
  t->add_option("--builtin", a.builtin, "The built-in task (no --model / --data): block | unet")->capture_default_str();
  t->add_option("--config", a.config, "UNet: the diffusers config.json of a single-file checkpoint given as --model");
  t->add_option("--prediction-type", d.schedule.prediction_type, "UNet: epsilon | v_prediction")->capture_default_str();
  t->add_option("--snr-gamma", a.snr_gamma, "UNet: min-SNR-γ loss weighting (e.g. 5; default: off)");
  t->add_option("--noise-offset", d.noise_offset, "UNet: noise offset (0: off)")->capture_default_str();
  t->add_option("--beta-schedule", d.schedule.beta_schedule, "UNet: scaled_linear | linear | squaredcos_cap_v2")
      ->capture_default_str();
  t->add_option("--beta-start", d.schedule.beta_start, "UNet: first beta")->capture_default_str();
  t->add_option("--beta-end", d.schedule.beta_end, "UNet: last beta")->capture_default_str();
  t->add_option("--num-train-timesteps", d.schedule.num_train_timesteps, "UNet: diffusion steps T")
      ->capture_default_str();
}
// Flags that only a UNet run uses.
const char* const kDiffusionFlags[] = {"--config", "--prediction-type", "--snr-gamma", "--noise-offset",
                                       "--beta-schedule", "--beta-start", "--beta-end", "--num-train-timesteps"};

void add_train(CLI::App& app, TrainArgs& a) {
  auto* t = app.add_subcommand("train", "Fine-tune a LoRA or Custom Diffusion adapter (no arguments: the built-in task)");
  t->add_option("--model", a.model,
                "Model directory: config.json + model.safetensors / model.h5 (a Transformer2DModel block), or a "
                "UNet2DConditionModel directory (the diffusion objective), or a single-file UNet with --config");
  t->add_option("--data", a.data,
                "Data file (safetensors or HDF5): hidden_states, encoder_hidden_states, target; for a UNet latents, "
                "encoder_hidden_states (+ text_embeds, time_ids; optional noise, timesteps)");
  t->add_option("--adapter", a.options.adapter, "lora | custom_diffusion")->capture_default_str();
  t->add_option("--rank", a.options.rank, "LoRA rank")->capture_default_str();
  t->add_option("--alpha", a.alpha, "LoRA network_alpha (scale alpha/rank; default: none, scale 1)");
  t->add_option("--targets", a.targets, "Comma-separated LoRA target modules")->capture_default_str();
  t->add_flag("--train-q-out", a.options.train_q_out, "Custom Diffusion: also train to_q and to_out (crossattn)");
  t->add_option("--lr", a.options.lr, "Learning rate")->capture_default_str();
  t->add_option("--optimizer", a.options.optimizer, "sgd | adam | adamw")->capture_default_str();
  t->add_option("--steps", a.options.steps, "Optimizer steps (with --resume: the run's new total; default: its planned length)")
      ->capture_default_str();
  t->add_option("--batch-size", a.options.batch_size, "Samples per step")->capture_default_str();
  t->add_option("--grad-accum", a.options.grad_accum, "Micro-batches accumulated per step")->capture_default_str();
  t->add_option("--seed", a.options.seed, "Seed (adapter init, shuffling), ≥ 0")
      ->capture_default_str()
      ->check(CLI::Validator(
          [](std::string& v) {
            return v.find('-') != std::string::npos ? std::string("must be a number ≥ 0, got " + v) : std::string();
          },
          "SEED ≥ 0", "non-negative seed"));
  t->add_option("--scheduler", a.options.scheduler, "constant | constant_with_warmup | linear | cosine")
      ->capture_default_str();
  t->add_option("--warmup-steps", a.options.warmup_steps, "LR warm-up steps")->capture_default_str();
  t->add_option("--max-grad-norm", a.options.max_grad_norm, "Clip the gradient norm (0: off)")->capture_default_str();
  t->add_option("--checkpoint-every", a.options.checkpoint_every, "Checkpoint every N steps (0: at the end)")
      ->capture_default_str();
  t->add_option("--init-adapter", a.options.init_adapter, "Start from this adapter file");
  t->add_option("--prefix", a.options.prefix, "Block of a full-UNet file, e.g. down_blocks.0.attentions.0");
  t->add_option("--out", a.options.out_dir, "Output directory")->capture_default_str();
  t->add_option("--resume", a.resume,
                "Continue the run whose checkpoint.h5 is in this directory, to its planned --steps (or to a given "
                "--steps: a larger total extends the run; constant schedules continue, linear/cosine hold their final "
                "LR). Training options cannot change on a resume");
  t->add_flag("--quiet", a.options.quiet, "No progress on stderr");
  t->add_flag("--no-cuda-graph", a.no_cuda_graph,
              "On CUDA, run every step eagerly instead of replaying a captured CUDA graph of the forward and "
              "backward (the numbers are the same)");
  add_placement_flags(t, a.options.device, a.options.precision, a.deterministic);
  add_diffusion_flags(t, a);
  t->add_option("--save-dtype", a.options.save_dtype,
                "f32 | bf16 | f16: dtype of the LoRA tensors in adapter.safetensors (training keeps f32)")
      ->capture_default_str();
}

// Flags of a real run that the built-in task (its own model, data and recipe) cannot use.
const char* const kNotForBuiltin[] = {"--config", "--alpha", "--targets", "--train-q-out", "--batch-size", "--grad-accum",
                                      "--scheduler", "--warmup-steps", "--max-grad-norm", "--checkpoint-every",
                                      "--init-adapter", "--prefix", "--prediction-type", "--snr-gamma",
                                      "--noise-offset", "--beta-schedule", "--beta-start", "--beta-end",
                                      "--num-train-timesteps", "--save-dtype"};
// Flags that change what a run computes: a resume continues with the saved ones.
const char* const kFixedOnResume[] = {"--adapter", "--rank", "--alpha", "--targets", "--train-q-out", "--lr",
                                      "--optimizer", "--batch-size", "--grad-accum", "--seed", "--scheduler",
                                      "--warmup-steps", "--max-grad-norm", "--checkpoint-every", "--init-adapter",
                                      "--prefix", "--prediction-type", "--snr-gamma", "--noise-offset",
                                      "--beta-schedule", "--beta-start", "--beta-end", "--num-train-timesteps", "--save-dtype"};

void validate_options(const trainer::TrainOptions& o) {
  try {
    o.validate();
  } catch (const Error& e) {
    throw UsageError(e.what());
  }
}

int run_builtin(TrainArgs& a, const CLI::App& cmd) {
  for (const char* flag : kNotForBuiltin)
    if (cmd.count(flag))
      throw UsageError(std::string("the built-in task (train without --model and --data) cannot use ") + flag +
                       ": it trains with its own recipe; give --model and --data for a real run");
  if (a.builtin != "block" && a.builtin != "unet")
    throw UsageError("--builtin must be block or unet, got '" + a.builtin + "'");
  const bool unet = a.builtin == "unet";
  validate_options(a.options);  // the same checks as a real run (--steps 0, --lr nan, --optimizer foo, …)
  trainer::BuiltinOptions b;
  b.adapter = a.options.adapter, b.quiet = a.options.quiet, b.seed = a.options.seed;
  b.out_dir = cmd.count("--out") ? a.options.out_dir : (unet ? "loom-builtin-unet" : "loom-builtin");
  b.steps = cmd.count("--steps") ? a.options.steps : 0;
  if (cmd.count("--rank")) b.rank = a.options.rank;
  if (cmd.count("--lr")) b.lr = a.options.lr;
  if (cmd.count("--optimizer")) b.optimizer = a.options.optimizer;
  announce_placement(a.options.device, a.options.precision, a.deterministic);
  b.device = a.options.device, b.precision = a.options.precision, b.cuda_graph = a.options.cuda_graph;
  const trainer::BuiltinReport r =
      unet ? trainer::run_builtin_unet_task(b, std::cout, std::cerr) : trainer::run_builtin_task(b, std::cout, std::cerr);
  std::cout << (r.passed ? "built-in task: PASSED" : "built-in task: FAILED") << "\n";
  if (unet)
    std::cout << "try: loom inspect " << r.adapter_path << " (whole-UNet keys), or train on its files: loom train "
              << "--model " << r.model_dir << " --data " << r.data_path << " --out " << b.out_dir << "/again\n";
  else
    std::cout << "try: loom run --model " << r.model_dir << " --input " << r.data_path << " --adapter "
              << r.adapter_path << " --output " << b.out_dir << "/output.safetensors\n";
  return r.passed ? 0 : 1;
}

// A UNet --model (a directory whose config.json names UNet2DConditionModel, or a single file with
// --config) turns the diffusion objective on, with the training scripts' --max-grad-norm 1 unless
// given. Returns whether it is one.
bool set_diffusion_options(TrainArgs& a, const CLI::App& cmd) {
  const bool unet = unet::is_unet_model(a.model, a.config);
  a.options.diffusion.enabled = unet;
  if (!unet) return false;
  if (cmd.count("--snr-gamma")) a.options.diffusion.snr_gamma = a.snr_gamma;
  if (!cmd.count("--max-grad-norm")) a.options.max_grad_norm = 1.0;
  if (cmd.count("--prefix")) throw UsageError("--prefix names a block of a UNet file; a UNet --model trains whole");
  return true;
}

void print_trained(const trainer::TrainResult& r) {
  if (r.peak_device_bytes)
    std::cerr << "loom: peak device memory " << std::fixed << std::setprecision(1) << double(r.peak_device_bytes) / 1e6
              << " MB (tensors held by loom's caching allocator)\n" << std::defaultfloat;
  std::cout << "trained " << r.steps << (r.steps == 1 ? " step" : " steps") << ": loss " << r.losses.front() << " -> "
            << r.losses.back() << "\n"
            << "adapter: " << r.adapter_path << "\ncheckpoint: " << r.checkpoint_path << "\n";
}

int run_train_unet(TrainArgs& a) {
  std::shared_ptr<unet::UNet2DConditionModel> model;
  {
    Doing doing("loading the UNet " + a.model);
    if (a.config.empty()) check_config_is_a_file(a.model);
    unet::LoadedUNet loaded = unet::load_unet(a.model, a.config);
    for (const auto& note : loaded.notes) std::cerr << "loom: --model: " << note << "\n";
    model = loaded.model;
  }
  trainer::DiffusionData data;
  {
    Doing doing("reading the data file " + a.data);
    data = trainer::DiffusionData::load(a.data);
  }
  data.check_fits(model->config(), a.options.diffusion, a.data);
  Doing doing("training");
  print_trained(trainer::train_unet(model, data, a.options, std::cerr, a.resume));
  return 0;
}

int run_train(TrainArgs& a, const CLI::App& cmd) {
  a.options.cuda_graph = !a.no_cuda_graph;
  if (a.builtin_flags_only()) return run_builtin(a, cmd);
  if (a.resume.empty() && (a.model.empty() || a.data.empty()))
    throw UsageError("train: --model and --data go together (or give neither for the built-in task)");
  if (a.model.empty() || a.data.empty()) throw UsageError("train: --resume needs --model and --data too");
  if (cmd.count("--builtin")) throw UsageError("--builtin goes without --model, --data and --resume");
  a.options.targets = split_list(a.targets);
  if (cmd.count("--alpha")) a.options.alpha = a.alpha;
  if (!set_diffusion_options(a, cmd)) {
    for (const char* flag : kDiffusionFlags)
      if (cmd.count(flag))
        throw UsageError(std::string(flag) + " is for a UNet --model (config.json \"_class_name\": "
                         "\"UNet2DConditionModel\"); " + a.model + " is a Transformer2DModel block");
  }
  if (!a.resume.empty()) {
    for (const char* flag : kFixedOnResume)
      if (cmd.count(flag))
        throw UsageError(std::string(flag) + " cannot be given with --resume: a resume continues the run with its "
                         "saved options (see them with: loom inspect " + a.resume + "/checkpoint.h5); to train on "
                         "with other options start a new run from the adapter (--init-adapter " + a.resume +
                         "/adapter.safetensors)");
    if (!cmd.count("--out")) a.options.out_dir = a.resume;
    if (cmd.count("--steps") && a.options.steps <= 0)
      throw UsageError("--steps must be positive, got " + std::to_string(a.options.steps));
    if (!cmd.count("--steps")) a.options.steps = 0;  // the run's planned length
  } else {
    validate_options(a.options);
  }
  announce_placement(a.options.device, a.options.precision, a.deterministic);
  if (a.options.diffusion.enabled) return run_train_unet(a);
  std::shared_ptr<attention::Transformer2DModel> model;
  {
    Doing doing("loading the model directory " + a.model);
    check_config_is_a_file(a.model);
    std::vector<std::string> notes;
    model = io::load_model_dir(a.model, a.options.prefix, DType::F32, &notes);
    for (const auto& note : notes) std::cerr << "loom: --model: " << note << "\n";
  }
  trainer::DataSet data;
  {
    Doing doing("reading the data file " + a.data);
    data = trainer::DataSet::load(a.data, true);
  }
  data.check_fits(model->config(), a.data);
  Doing doing("training");
  print_trained(trainer::train(model, data, a.options, std::cerr, a.resume));
  return 0;
}

// ---- run ---------------------------------------------------------------------------------------

struct RunArgs {
  std::string model, config, input, output, prefix, backend;
  std::vector<std::string> adapters;
  bool fuse = false;
  int64_t batch_size = 8;
  std::string device, precision;
  bool no_cuda_graph = false, deterministic = false;
};

void add_run(CLI::App& app, RunArgs& a) {
  auto* r = app.add_subcommand("run", "Run a model (with adapters) on every sample of a data file");
  r->add_option("--model", a.model,
                "Model directory: one block (Transformer2DModel) or a whole UNet; or a single-file UNet with --config")
      ->required();
  r->add_option("--config", a.config, "UNet: the diffusers config.json of a single-file checkpoint given as --model");
  r->add_option("--input", a.input,
                "Data file: hidden_states (+ encoder_hidden_states, mask) for a block; for a UNet sample, timestep, "
                "encoder_hidden_states (+ encoder_attention_mask, SDXL text_embeds, time_ids)")
      ->required();
  r->add_option("--output", a.output, "Output file (.safetensors, or .h5 for HDF5) holding 'output'")->required();
  r->add_option("--adapter", a.adapters, "Adapter file, optionally FILE:WEIGHT; repeatable");
  r->add_option("--prefix", a.prefix, "Block of a full-UNet file, e.g. down_blocks.0.attentions.0");
  r->add_option("--backend", a.backend, "Attention backend: math | flash | sliced");
  r->add_flag("--fuse", a.fuse, "Fuse the LoRA adapters into the weights before running");
  r->add_option("--batch-size", a.batch_size, "Samples per forward")->capture_default_str();
  add_placement_flags(r, a.device, a.precision, a.deterministic);
  r->add_flag("--no-cuda-graph", a.no_cuda_graph,
              "On CUDA, run every batch eagerly instead of replaying a captured CUDA graph of a block's forward");
}

// A model directory holding one spatial-transformer block (SPEC §3).
trainer::RunResult run_block_dir(const trainer::RunOptions& o, const std::string& input) {
  trainer::DataSet inputs;
  {
    Doing doing("reading the data file " + input);
    inputs = trainer::DataSet::load(input, false);
  }
  inputs.check_fits(attention::Transformer2DConfig::from_file(o.model_dir + "/config.json"), input);
  Doing doing("running the model " + o.model_dir);
  return trainer::run_model(o, inputs);
}

// A whole UNet2DConditionModel: a directory, or a single file with --config (SPEC §8).
trainer::RunResult run_unet_model(const trainer::RunOptions& o, const std::string& input) {
  trainer::UNetRunInputs inputs;
  {
    Doing doing("reading the input file " + input);
    inputs = trainer::UNetRunInputs::load(input);
  }
  Doing doing("running the UNet " + o.model_dir);
  return trainer::run_unet(o, inputs, input);
}

int run_run(const RunArgs& a) {
  trainer::RunOptions o;
  try {
    o.model_dir = a.model, o.config = a.config, o.prefix = a.prefix, o.fuse = a.fuse, o.batch_size = a.batch_size;
    for (const auto& s : a.adapters) o.adapters.push_back(trainer::AdapterSpec::parse(s));
    if (!a.backend.empty()) o.backend = attention::parse_backend(a.backend, "--backend");
    if (a.batch_size <= 0) throw Error("--batch-size must be positive");
  } catch (const Error& e) {
    throw UsageError(e.what());
  }
  announce_placement(a.device, a.precision, a.deterministic);
  o.device = a.device, o.precision = a.precision, o.cuda_graph = !a.no_cuda_graph;
  if (same_file(a.output, a.input))
    throw UsageError("--output " + a.output + " is the --input file " + a.input + ": it would be replaced by the output");
  for (const auto& spec : o.adapters)
    if (same_file(a.output, spec.path))
      throw UsageError("--output " + a.output + " is the --adapter file " + spec.path + ": it would be replaced");
  const trainer::RunResult r =
      unet::is_unet_model(a.model, a.config) ? run_unet_model(o, a.input) : run_block_dir(o, a.input);
  for (const auto& note : r.model_notes) std::cerr << "loom: --model: " << note << "\n";
  if (!r.graph_note.empty()) std::cerr << "loom: warning: " << r.graph_note << "\n";
  if (r.graph_replays > 0)
    std::cerr << "loom: " << r.graph_replays << " batches replayed from a CUDA graph (--no-cuda-graph: none)\n";
  for (const auto& rep : r.reports) std::cerr << rep.summary() << "\n";
  const bool h5 = a.output.size() > 3 && (a.output.rfind(".h5") == a.output.size() - 3);
  if (h5)
    io::write_hdf5(a.output, {{"output", r.output}}, {{"format", std::string("loom")}, {"kind", std::string("output")}});
  else
    io::write_safetensors(a.output, {{"output", r.output}});
  std::cout << "wrote " << a.output << ": output " << r.output.shape() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"loom: train and run attention adapters (LoRA, Custom Diffusion) for diffusion models"};
  app.require_subcommand(1);
  TrainArgs train;
  RunArgs run;
  std::string inspect_file, convert_in, convert_out, convert_to = "peft", grad_filter;
  add_train(app, train);
  add_run(app, run);
  loom::cli::SampleArgs sample;
  CLI::App* sample_cmd = loom::cli::add_sample(app, sample);
  auto* inspect = app.add_subcommand("inspect", "Show a weight file: format, key family, tensors, ranks, alphas");
  inspect->add_option("file", inspect_file, "safetensors or HDF5 file")->required();
  auto* convert = app.add_subcommand("convert", "Convert an adapter file between key families");
  convert->add_option("in", convert_in, "Input adapter file")->required();
  convert->add_option("out", convert_out, "Output file")->required();
  convert->add_option("--to", convert_to, "diffusers | peft | kohya | loom")->capture_default_str();
  io::WriteOptions convert_options;
  convert->add_flag("--sgm", convert_options.sgm_names,
                    "kohya: original SGM/LDM block names (input_blocks_4_1_…), as sd-scripts writes SDXL LoRAs");
  cli::ExtractArgs extract_args;
  cli::ResizeArgs resize_args;
  auto* extract_cmd = cli::add_extract(app, extract_args);
  auto* resize_cmd = cli::add_resize(app, resize_args);
  auto* gradcheck_cmd = app.add_subcommand("gradcheck", "Run the f64 gradient checks of the ops and layers");
  gradcheck_cmd->add_option("--filter", grad_filter, "Only checks whose name contains this");
  cli::VaeArgs vae;  // decode, encode (loom_vae.cpp)
  cli::add_vae_commands(app, vae);
  io::remove_temp_files_on_signals();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  try {
    if (app.got_subcommand("train")) return run_train(train, *app.get_subcommand("train"));
    if (app.got_subcommand("run")) return run_run(run);
    if (app.got_subcommand("sample")) {
      Doing doing("sampling with " + sample.model);
      return loom::cli::run_sample(sample, *sample_cmd);
    }
    if (app.got_subcommand("inspect")) {
      Doing doing("reading " + inspect_file);
      return cli::run_inspect(inspect_file);
    }
    if (app.got_subcommand("convert")) {
      io::KeyFamily family;
      try {
        family = io::parse_family(convert_to);
      } catch (const Error& e) {
        throw UsageError(std::string("--to: ") + e.what());
      }
      if (same_file(convert_in, convert_out))
        throw UsageError("the output " + convert_out + " is the input file " + convert_in + ": it would be replaced");
      if (convert_options.sgm_names && family != io::KeyFamily::Kohya) throw UsageError("--sgm goes with --to kohya");
      Doing doing("converting " + convert_in);
      const io::ConvertReport r = io::convert_adapter_file(convert_in, convert_out, family, convert_options);
      std::cout << "wrote " << convert_out << " (" << convert_to << (convert_options.sgm_names ? ", SGM names" : "")
                << "): " << r.summary() << "\n";
      return 0;
    }
    if (app.got_subcommand("gradcheck")) return cli::run_gradcheck(grad_filter);
    if (app.got_subcommand("decode") || app.got_subcommand("encode")) {
      Doing doing("running the VAE " + vae.vae);
      return cli::run_vae_command(app, vae);
    }
    if (app.got_subcommand("extract")) {
      Doing doing("extracting a LoRA from " + extract_args.tuned);
      return cli::run_extract(extract_args, *extract_cmd);
    }
    if (app.got_subcommand("resize")) {
      Doing doing("resizing " + resize_args.in);
      return cli::run_resize(resize_args, *resize_cmd);
    }
  } catch (const UsageError& e) {
    std::cerr << "loom: " << e.what() << "\n(see loom --help)\n";
    return 2;
  } catch (const trainer::OptionError& e) {
    std::cerr << "loom: " << e.what() << "\n";
    return 2;
  } catch (const io::FileError& e) {
    std::cerr << "loom: " << e.what() << "\n";
    return 3;
  } catch (const trainer::NumericalError& e) {
    std::cerr << "loom: " << e.what() << "\n";
    return 4;
  } catch (const Error& e) {
    std::cerr << "loom: " << e.what() << "\n";
    return 3;
  } catch (const std::bad_alloc&) {
    std::cerr << "loom: out of memory while " << g_doing << "\n";
    return 3;
  } catch (const std::length_error& e) {  // a size beyond what a container can hold
    std::cerr << "loom: out of memory while " << g_doing << " (" << e.what() << ")\n";
    return 3;
  } catch (const std::exception& e) {
    std::cerr << "loom: unexpected error while " << g_doing << ": " << e.what() << "\n";
    return 3;
  } catch (...) {
    std::cerr << "loom: unexpected error while " << g_doing << "\n";
    return 3;
  }
  return 2;
}
