#include "trainer/builtin_task.h"

#include <cmath>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <sys/stat.h>

#include "adapters/lora.h"
#include "io/adapter_io.h"
#include "tensor/ops.h"
#include "trainer/run.h"
#include "trainer/trainer.h"

namespace loom::trainer {

namespace {

constexpr int64_t kSamples = 32, kSide = 8, kContext = 12;
constexpr int64_t kHiddenRank = 4;
constexpr double kChangeScale = 0.5;  // ‖ΔW‖ / ‖W‖

attention::Transformer2DConfig task_config() {
  attention::Transformer2DConfig c;
  c.in_channels = 32, c.num_attention_heads = 4, c.attention_head_dim = 8, c.num_layers = 1;
  c.cross_attention_dim = 24, c.norm_num_groups = 8;
  return c;
}

std::string config_json(const attention::Transformer2DConfig& c) {
  std::ostringstream os;
  os << "{\n  \"_class_name\": \"Transformer2DModel\",\n  \"in_channels\": " << c.in_channels
     << ",\n  \"num_attention_heads\": " << c.num_attention_heads << ",\n  \"attention_head_dim\": "
     << c.attention_head_dim << ",\n  \"num_layers\": " << c.num_layers << ",\n  \"cross_attention_dim\": "
     << *c.cross_attention_dim << ",\n  \"norm_num_groups\": " << c.norm_num_groups << "\n}\n";
  return os.str();
}

double squared_norm(const Tensor& t) { return ops::sum(ops::square(t.to(DType::F64))).item(); }

// The hidden change of one weight: rank-r (LoRA task) or full rank (Custom Diffusion task),
// scaled to kChangeScale of the weight's norm.
Tensor hidden_change(const Tensor& w, bool low_rank, Generator& gen) {
  const int64_t out = w.size(0), in = w.size(1);
  Tensor delta = low_rank ? ops::matmul(Tensor::randn({out, kHiddenRank}, gen), Tensor::randn({kHiddenRank, in}, gen))
                          : Tensor::randn({out, in}, gen);
  return ops::mul_scalar(delta, kChangeScale * std::sqrt(squared_norm(w) / squared_norm(delta)));
}

// Projections the teacher changes: to_v of every attention layer (LoRA: a change there is
// identifiable from the outputs, unlike one that passes through the softmax in to_q / to_k or
// one split between to_v and to_out.0), or attn2's to_k and to_v (Custom Diffusion, which trains
// exactly those).
std::vector<std::string> changed_modules(const attention::Transformer2DModel& m, bool lora) {
  std::vector<std::string> paths;
  for (const auto& [name, attn] : m.attention_layers()) {
    const bool attn2 = name.size() >= 5 && name.compare(name.size() - 5, 5, "attn2") == 0;
    for (const char* p : lora ? std::vector<const char*>{"to_v"} : std::vector<const char*>{"to_k", "to_v"})
      if (lora || attn2) paths.push_back(name + "." + p);
  }
  return paths;
}

}  // namespace

BuiltinReport run_builtin_task(const BuiltinOptions& opt, std::ostream& out, std::ostream& log) {
  const bool lora = opt.adapter == "lora";
  LOOM_CHECK(lora || opt.adapter == "custom_diffusion", "--adapter must be lora or custom_diffusion, got '",
             opt.adapter, "'");
  BuiltinReport report;
  const std::string dir = opt.out_dir;
  report.model_dir = dir + "/base_model";
  report.data_path = dir + "/data.safetensors";

  // Base and teacher: the same seeded weights, plus the hidden change in the teacher.
  const attention::Transformer2DConfig config = task_config();
  Generator base_gen(opt.seed), teacher_gen(opt.seed), change_gen(opt.seed + 101), data_gen(opt.seed + 202);
  auto base = std::make_shared<attention::Transformer2DModel>(config, base_gen);
  attention::Transformer2DModel teacher(config, teacher_gen);
  std::map<std::string, Tensor> deltas;
  for (const std::string& path : changed_modules(teacher, lora)) {
    const Tensor w = teacher.find_parameter(path + ".weight").tensor();
    deltas[path] = hidden_change(w, lora, change_gen);
    teacher.set_parameter_data(path + ".weight", ops::add(w, deltas[path]));
  }
  base->eval(), teacher.eval();

  // Data: random inputs, the teacher's outputs as targets.
  DataSet data;
  data.hidden_states = Tensor::randn({kSamples, config.in_channels, kSide, kSide}, data_gen);
  data.encoder_hidden_states = Tensor::randn({kSamples, kContext, *config.cross_attention_dim}, data_gen);
  {
    NoGradGuard ng;
    data.target = teacher.forward(Variable(data.hidden_states), Variable(data.encoder_hidden_states)).tensor();
  }
  TrainOptions t;
  t.out_dir = dir, t.quiet = opt.quiet, t.seed = opt.seed, t.adapter = opt.adapter;
  t.device = opt.device, t.precision = opt.precision, t.cuda_graph = opt.cuda_graph;
  const Placement where = placement_of(opt.device, opt.precision);
  const bool low = where.precision == Precision::BF16 || where.precision == Precision::F16;
  // Full-batch steps: the targets are exact, so the gradient vanishes at the optimum and Adam settles.
  t.rank = opt.rank.value_or(kHiddenRank), t.alpha = double(t.rank), t.batch_size = kSamples;
  t.targets = {"to_v"};  // the LoRA adapts the projections the teacher changed
  t.optimizer = opt.optimizer.value_or("adam"), t.lr = opt.lr.value_or(lora ? 2e-2 : 5e-3);
  t.steps = opt.steps > 0 ? opt.steps : (lora ? 600 : 300);
  t.scheduler = "cosine", t.warmup_steps = 10;
  t.validate();  // before any file is written
  // Files first, so `loom run` can be pointed at them.
  {
    std::vector<std::pair<std::string, Tensor>> weights;
    for (const auto& [k, v] : base->state_dict()) weights.emplace_back(k, v);
    std::vector<std::pair<std::string, Tensor>> tensors{{"hidden_states", data.hidden_states},
                                                        {"encoder_hidden_states", data.encoder_hidden_states},
                                                        {"target", data.target}};
    make_dirs(report.model_dir);
    io::write_file_atomic(report.model_dir + "/config.json", config_json(config));
    io::write_safetensors(report.model_dir + "/model.safetensors", weights);
    io::write_safetensors(report.data_path, tensors);
  }
  out << "loom built-in task: " << (lora ? "LoRA" : "Custom Diffusion") << " on a spatial transformer ("
      << config.in_channels << " channels, " << config.num_attention_heads << " heads, " << kSide << "x" << kSide
      << " tokens, context " << kContext << "x" << *config.cross_attention_dim << "), hidden change on "
      << deltas.size() << " projections, " << t.steps << " steps\n";

  const TrainResult r = train(base, data, t, log);
  report.adapter_path = r.adapter_path;
  report.start_loss = r.losses.front();
  report.final_loss = r.losses.back();

  // Recovery of the hidden change, over every adapted projection (those the teacher left
  // alone should learn no change).
  if (lora)
    for (const auto& [path, m] : r.lora->adapter("default").modules())
      if (!deltas.count(path)) deltas[path] = Tensor::zeros({m.up.size(0), m.down.size(1)}, DType::F64);
  double err = 0, total = 0;
  for (const auto& [path, delta] : deltas) {
    Tensor learned;
    total += squared_norm(delta);
    if (lora) {  // ΔW_learned = s·B·A of the trained adapter, still attached to the model
      const adapters::LoraModule& m = r.lora->adapter("default").modules().at(path);
      learned = ops::mul_scalar(ops::matmul(m.up.tensor().to(DType::F64), m.down.tensor().to(DType::F64)), m.scale());
    } else {
      const std::string layer = path.substr(0, path.rfind('.'));
      const std::string proj = path.substr(path.rfind('.') + 1);
      const Tensor w_cd = base->find_parameter(layer + ".processor." + proj + "_custom_diffusion.weight").tensor();
      learned = ops::sub(w_cd.to(DType::F64), base->find_parameter(path + ".weight").tensor().to(DType::F64));
    }
    err += squared_norm(ops::sub(learned.to(Device::cpu()), delta.to(DType::F64)));
  }
  report.recovered = 1.0 - err / total;

  // Reload: the base model directory plus the saved adapter, through run_model (what `loom run` does).
  RunOptions ro;
  ro.model_dir = report.model_dir;
  ro.device = opt.device, ro.precision = opt.precision;
  ro.adapters.push_back({r.adapter_path, 1.0});
  DataSet inputs = data;
  inputs.target = Tensor();
  const Tensor reloaded = run_model(ro, inputs).output;
  Tensor trained;
  {
    NoGradGuard ng;
    const DType act = storage_dtype(where.precision);
    trained = base->forward(Variable(data.hidden_states.to(where.device).to(act)),
                            Variable(data.encoder_hidden_states.to(where.device).to(act)))
                  .tensor()
                  .to(DType::F32)
                  .to(Device::cpu());
  }
  report.reload_error = std::sqrt(squared_norm(ops::sub(reloaded, trained)) / squared_norm(trained));
  const double loss_target = low ? 0.10 : 0.01, reload_tol = low ? 1e-2 : 1e-5;
  const bool converged = report.final_loss <= loss_target * report.start_loss;
  report.passed = converged && report.reload_error <= reload_tol;

  out << std::scientific << std::setprecision(3);
  out << "  start loss      " << report.start_loss << "\n";
  out << "  final loss      " << report.final_loss << "  (" << std::fixed << std::setprecision(2)
      << 100.0 * report.final_loss / report.start_loss << "% of start; target ≤ " << 100 * loss_target
      << "%: " << (converged ? "met" : "MISSED")
      << ")\n";
  out << "  recovered       " << std::setprecision(1) << 100.0 * report.recovered
      << "% of the hidden change (1 − ‖learned − hidden‖² / ‖hidden‖²)\n";
  out << "  reload check    " << std::scientific << std::setprecision(2) << report.reload_error
      << " relative error, saved adapter loaded again on " << report.model_dir << ": "
      << (report.reload_error <= reload_tol ? "ok" : "FAILED") << "\n";
  out << std::defaultfloat << "  time            " << std::fixed << std::setprecision(1) << r.seconds
      << " s training on " << where.device.str() << " (" << precision_name(where.precision) << ")";
  if (r.peak_device_bytes) out << ", peak device memory " << std::setprecision(1) << double(r.peak_device_bytes) / 1e6 << " MB";
  out << "\n  files           " << r.adapter_path << ", " << r.checkpoint_path << ", " << dir
      << "/loss.csv, " << dir << "/loss.png\n" << std::defaultfloat;
  return report;
}

}  // namespace loom::trainer
