#include "trainer/builtin_common.h"

#include <cmath>
#include <iomanip>
#include <ostream>

#include "adapters/lora.h"
#include "tensor/ops.h"

namespace loom::trainer::builtin {

double squared_norm(const Tensor& t) { return ops::sum(ops::square(t.to(DType::F64))).item(); }

std::map<std::string, Tensor> add_hidden_changes(nn::Module& teacher, const std::vector<std::string>& paths,
                                                 bool low_rank, Generator& gen) {
  std::map<std::string, Tensor> deltas;
  for (const std::string& path : paths) {
    const Tensor w = teacher.find_parameter(path + ".weight").tensor();
    const int64_t out = w.size(0), in = w.size(1);
    Tensor delta = low_rank ? ops::matmul(Tensor::randn({out, kHiddenRank}, gen), Tensor::randn({kHiddenRank, in}, gen))
                            : Tensor::randn({out, in}, gen);
    delta = ops::mul_scalar(delta, kChangeScale * std::sqrt(squared_norm(w) / squared_norm(delta)));
    teacher.set_parameter_data(path + ".weight", ops::add(w, delta));
    deltas[path] = delta;
  }
  return deltas;
}

double recovered_share(const nn::Module& base, const TrainResult& r, std::map<std::string, Tensor> deltas) {
  if (r.lora)
    for (const auto& [path, m] : r.lora->adapter("default").modules())
      if (!deltas.count(path)) deltas[path] = Tensor::zeros({m.up.size(0), m.down.size(1)}, DType::F64);
  double err = 0, total = 0;
  for (const auto& [path, delta] : deltas) {
    Tensor learned;
    if (r.lora) {  // ΔW_learned = s·B·A of the trained adapter, still attached to the model
      const adapters::LoraModule& m = r.lora->adapter("default").modules().at(path);
      learned = ops::mul_scalar(ops::matmul(m.up.tensor().to(DType::F64), m.down.tensor().to(DType::F64)), m.scale());
    } else {
      const std::string layer = path.substr(0, path.rfind('.')), proj = path.substr(path.rfind('.') + 1);
      const Tensor w_cd = base.find_parameter(layer + ".processor." + proj + "_custom_diffusion.weight").tensor();
      learned = ops::sub(w_cd.to(DType::F64), base.find_parameter(path + ".weight").tensor().to(DType::F64));
    }
    total += squared_norm(delta);
    err += squared_norm(ops::sub(learned.to(Device::cpu()), delta.to(DType::F64)));
  }
  return 1.0 - err / total;
}

BuiltinReport start_report(const BuiltinOptions& opt) {
  LOOM_CHECK(opt.adapter == "lora" || opt.adapter == "custom_diffusion",
             "--adapter must be lora or custom_diffusion, got '", opt.adapter, "'");
  BuiltinReport report;
  report.model_dir = opt.out_dir + "/base_model";
  report.data_path = opt.out_dir + "/data.safetensors";
  return report;
}

TrainOptions train_options(const BuiltinOptions& opt, int64_t samples) {
  const bool lora = opt.adapter == "lora";
  TrainOptions t;
  t.out_dir = opt.out_dir, t.quiet = opt.quiet, t.seed = opt.seed, t.adapter = opt.adapter;
  t.device = opt.device, t.precision = opt.precision, t.cuda_graph = opt.cuda_graph;
  // Full-batch steps: the targets are exact, so the gradient vanishes at the optimum and Adam settles.
  t.rank = opt.rank.value_or(kHiddenRank), t.alpha = double(t.rank), t.batch_size = samples;
  t.optimizer = opt.optimizer.value_or("adam"), t.lr = opt.lr.value_or(lora ? 2e-2 : 5e-3);
  t.scheduler = "cosine", t.warmup_steps = 10;
  return t;
}

Thresholds thresholds(const Placement& where, double f32_loss_fraction) {
  const bool low = where.precision == Precision::BF16 || where.precision == Precision::F16;
  return low ? Thresholds{0.10, 1e-2} : Thresholds{f32_loss_fraction, 1e-5};
}

void finish_report(BuiltinReport& report, const TrainResult& r, const Placement& where, const Thresholds& th,
                   const std::string& dir, std::ostream& out) {
  const bool converged = report.final_loss <= th.loss_fraction * report.start_loss;
  report.passed = converged && report.reload_error <= th.reload_tolerance;
  out << std::scientific << std::setprecision(3);
  out << "  start loss      " << report.start_loss << "\n";
  out << "  final loss      " << report.final_loss << "  (" << std::fixed << std::setprecision(2)
      << 100.0 * report.final_loss / report.start_loss << "% of start; target ≤ " << 100 * th.loss_fraction
      << "%: " << (converged ? "met" : "MISSED") << ")\n";
  out << "  recovered       " << std::setprecision(1) << 100.0 * report.recovered
      << "% of the hidden change (1 − ‖learned − hidden‖² / ‖hidden‖²)\n";
  out << "  reload check    " << std::scientific << std::setprecision(2) << report.reload_error
      << " relative error, saved adapter loaded again on " << report.model_dir << ": "
      << (report.reload_error <= th.reload_tolerance ? "ok" : "FAILED") << "\n";
  out << std::defaultfloat << "  time            " << std::fixed << std::setprecision(1) << r.seconds
      << " s training on " << where.device.str() << " (" << precision_name(where.precision) << ")";
  if (r.peak_device_bytes) out << ", peak device memory " << std::setprecision(1) << double(r.peak_device_bytes) / 1e6 << " MB";
  out << "\n  files           " << r.adapter_path << ", " << r.checkpoint_path << ", " << dir << "/loss.csv, " << dir
      << "/loss.png\n" << std::defaultfloat;
}

}  // namespace loom::trainer::builtin
