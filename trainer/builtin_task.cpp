#include "trainer/builtin_task.h"

#include <cmath>
#include <iomanip>
#include <ostream>
#include <sstream>
#include <sys/stat.h>

#include "adapters/lora.h"
#include "io/adapter_io.h"
#include "tensor/ops.h"
#include "trainer/builtin_common.h"
#include "trainer/run.h"
#include "trainer/trainer.h"

namespace loom::trainer {

namespace {

using builtin::squared_norm;

constexpr int64_t kSamples = 32, kSide = 8, kContext = 12;

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
  BuiltinReport report = builtin::start_report(opt);
  const std::string dir = opt.out_dir;

  // Base and teacher: the same seeded weights, plus the hidden change in the teacher.
  const attention::Transformer2DConfig config = task_config();
  Generator base_gen(opt.seed), teacher_gen(opt.seed), change_gen(opt.seed + 101), data_gen(opt.seed + 202);
  auto base = std::make_shared<attention::Transformer2DModel>(config, base_gen);
  attention::Transformer2DModel teacher(config, teacher_gen);
  const std::map<std::string, Tensor> deltas =
      builtin::add_hidden_changes(teacher, changed_modules(teacher, lora), lora, change_gen);
  base->eval(), teacher.eval();

  // Data: random inputs, the teacher's outputs as targets.
  DataSet data;
  data.hidden_states = Tensor::randn({kSamples, config.in_channels, kSide, kSide}, data_gen);
  data.encoder_hidden_states = Tensor::randn({kSamples, kContext, *config.cross_attention_dim}, data_gen);
  {
    NoGradGuard ng;
    data.target = teacher.forward(Variable(data.hidden_states), Variable(data.encoder_hidden_states)).tensor();
  }
  TrainOptions t = builtin::train_options(opt, kSamples);
  const Placement where = placement_of(opt.device, opt.precision);
  t.targets = {"to_v"};  // the LoRA adapts the projections the teacher changed
  t.steps = opt.steps > 0 ? opt.steps : (lora ? 600 : 300);
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

  report.recovered = builtin::recovered_share(*base, r, deltas);

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
  builtin::finish_report(report, r, where, builtin::thresholds(where, 0.01), dir, out);
  return report;
}

}  // namespace loom::trainer
