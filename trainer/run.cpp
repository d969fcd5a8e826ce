#include "trainer/run.h"

#include <sys/stat.h>

#include <cmath>
#include <cstdlib>

#include "adapters/lora.h"
#include "tensor/graph.h"
#include "tensor/ops.h"

namespace loom::trainer {

AdapterSpec AdapterSpec::parse(const std::string& text) {
  AdapterSpec spec{text, 1.0, false};
  LOOM_CHECK(!text.empty(), "--adapter: empty file name");
  const size_t colon = text.rfind(':');
  struct stat st {};
  // A name that exists as given is a file, even with a ':' in it; otherwise FILE:WEIGHT.
  if (colon == std::string::npos || ::stat(text.c_str(), &st) == 0) return spec;
  const std::string tail = text.substr(colon + 1);
  char* end = nullptr;
  const double w = std::strtod(tail.c_str(), &end);
  LOOM_CHECK(!tail.empty() && end && *end == '\0' && std::isfinite(w), "--adapter '", text, "': the weight '", tail,
             "' is not a finite number (FILE or FILE:WEIGHT, e.g. style.safetensors:0.7)");
  spec.path = text.substr(0, colon);
  spec.weight = w;
  spec.weight_given = true;
  LOOM_CHECK(!spec.path.empty(), "--adapter '", text, "': no file name");
  return spec;
}

namespace {

// Runs the model over the samples in batches, returning (N, C, H, W). Inputs go to the model's
// device in its activation dtype; the output comes back f32 on the CPU. With `graphs` (CUDA),
// the forward of a full batch is captured once after the first batch and replayed for the other
// full batches, their inputs copied into the captured ones first; a last, smaller batch runs
// eagerly. A capture that fails leaves a note in `note` and the rest runs eagerly.
Tensor forward_all(const attention::Transformer2DModel& model, const DataSet& data, int64_t batch,
                   const Placement& where, bool graphs, int64_t& replays, std::string& note) {
  NoGradGuard no_grad;
  const DType act = storage_dtype(where.precision);
  const bool has_ctx = data.encoder_hidden_states.defined(), has_mask = data.encoder_attention_mask.defined();
  // x, ctx, mask on the device in the data's dtype: cast to the activation dtype there
  auto forward = [&](const Tensor& x, const Tensor& ctx, const Tensor& mask) {
    auto cast = [&](const Tensor& t) { return t.defined() ? t.to(act) : t; };
    return model.forward(Variable(cast(x)), has_ctx ? Variable(cast(ctx)) : Variable(), cast(mask))
        .tensor()
        .to(DType::F32);
  };
  std::unique_ptr<DeviceGraph> graph;
  std::vector<Tensor> fixed(3);  // the captured forward's inputs: hidden states, context, mask
  PinnedUpload uploads[3];
  Tensor captured_out;
  std::vector<Tensor> outs;
  for (int64_t i = 0; i < data.size(); i += batch) {
    const int64_t n = std::min(batch, data.size() - i);
    const Tensor rows[3] = {data.hidden_states.narrow(0, i, n),
                            has_ctx ? data.encoder_hidden_states.narrow(0, i, n) : Tensor(),
                            has_mask ? data.encoder_attention_mask.narrow(0, i, n) : Tensor()};
    const bool full = n == batch && i > 0;  // the first batch warms up eagerly
    if (graphs && full && !graph) {
      for (size_t k = 0; k < 3; ++k)
        if (rows[k].defined()) fixed[k] = Tensor::empty(rows[k].shape(), rows[k].dtype(), where.device);
      auto g = std::make_unique<DeviceGraph>(where.device);
      try {
        g->capture([&] { captured_out = forward(fixed[0], fixed[1], fixed[2]); });
        graph = std::move(g);
      } catch (const Error& e) {
        const std::string what = e.what();
        note = "CUDA graph capture failed, running eagerly: " + what.substr(0, what.find('\n'));
        graphs = false;
      }
    }
    if (graph && full) {
      for (size_t k = 0; k < 3; ++k)
        if (rows[k].defined()) uploads[k].copy(fixed[k], rows[k]);
      graph->replay();
      ++replays;
      outs.push_back(captured_out.to(Device::cpu()));  // waits for the replay
      continue;
    }
    auto on_device = [&](const Tensor& t) { return t.defined() ? t.to(where.device) : t; };
    outs.push_back(forward(on_device(rows[0]), on_device(rows[1]), on_device(rows[2])).to(Device::cpu()));
  }
  return outs.size() == 1 ? outs[0] : ops::cat(outs, 0);
}

}  // namespace

AttachedAdapters attach_adapters(const std::shared_ptr<nn::Module>& model, const std::vector<AdapterSpec>& specs,
                                 const io::AdapterLoadOptions& options) {
  AttachedAdapters out;
  for (size_t i = 0; i < specs.size(); ++i) {
    const AdapterSpec& spec = specs[i];
    if (io::is_custom_diffusion_file(io::read_tensor_file(spec.path))) {
      if (spec.weight_given)
        throw OptionError("--adapter " + spec.path + ":" + std::to_string(spec.weight) +
                          ": Custom Diffusion adapters take no weight (they replace projections); give the file alone");
      out.reports.push_back(io::load_custom_diffusion(*model, spec.path, options));
      continue;
    }
    if (!out.lora) out.lora = std::make_unique<adapters::LoraSet>(model);
    const std::string name = "adapter" + std::to_string(i);
    out.reports.push_back(io::load_lora(*out.lora, name, spec.path, options));
    out.lora->set_weight(name, spec.weight);
  }
  return out;
}

std::vector<std::string> take_named_tensors(const io::TensorFile& file,
                                            const std::vector<std::pair<const char*, Tensor*>>& slots) {
  std::vector<std::string> unused;
  for (const auto& [name, tensor] : file.tensors) {
    bool used = false;
    for (const auto& [key, slot] : slots)
      if (name == key) *slot = tensor.to(DType::F32), used = true;
    if (!used) unused.push_back(name);
  }
  return unused;
}

void note_unused_keys(const std::vector<std::string>& unused, const std::string& input_name,
                      const std::string& command, std::vector<std::string>& notes) {
  if (unused.empty()) return;
  std::string keys;
  for (const auto& k : unused) keys += (keys.empty() ? "" : ", ") + k;
  notes.push_back(input_name + ": not used by " + command + ": " + keys);
}

RunResult run_model(const RunOptions& o, const DataSet& inputs) {
  LOOM_CHECK(o.batch_size > 0, "run: batch size must be positive");
  const Placement where = placement_of(o.device, o.precision);
  RunResult result;
  auto model = io::load_model_dir(o.model_dir, o.prefix, DType::F32, &result.model_notes);
  model->eval();
  place_model(*model, where);  // adapters loaded next are made on the device (f32 masters)
  std::optional<attention::ScopedAttentionBackend> scoped;
  if (o.backend) scoped.emplace(*o.backend);
  io::AdapterLoadOptions lo;
  lo.prefix = o.prefix;
  lo.strict = o.strict;
  AttachedAdapters attached = attach_adapters(model, o.adapters, lo);
  const std::unique_ptr<adapters::LoraSet>& lora = attached.lora;
  result.reports = std::move(attached.reports);
  if (o.fuse && lora) lora->fuse();
  const bool graphs = o.cuda_graph && device_graphs_supported(where.device);
  result.output = forward_all(*model, inputs, o.batch_size, where, graphs, result.graph_replays, result.graph_note);
  for (double v : result.output.to_vector())
    if (!std::isfinite(v)) throw NumericalError("run: the output holds NaN or Inf");
  return result;
}

}  // namespace loom::trainer
