#include "trainer/step_graph.h"

#include <ostream>

#include "autograd/ops.h"
#include "nn/norm.h"
#include "tensor/ops.h"

namespace loom::trainer {

namespace {

// Why this run cannot use graphs ("" when it can).
std::string graph_obstacle(const TrainOptions& o, const nn::Module& model, const optim::GradScaler* scaler) {
  if (scaler) return "precision f16: the loss scale changes during the run";
  if (o.adapter == "custom_diffusion") return "Custom Diffusion copies host constants to the device in its forward";
  for (const auto& [path, module] : model.named_modules())
    if (const auto* d = dynamic_cast<const nn::Dropout*>(module.get()); d && d->p() > 0)
      return "dropout in '" + path + "' draws its seed on the host at every step";
  return "";
}

// The first line of an error message.
std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

}  // namespace

StepComputer::StepComputer(const BatchObjective& objective, const Placement& where, const TrainOptions& o,
                           std::vector<Variable> params, const nn::Module& model, const optim::GradScaler* scaler,
                           std::ostream& log)
    : objective_(objective), where_(where), grad_accum_(o.grad_accum), params_(std::move(params)), scaler_(scaler),
      log_(log) {
  LOOM_CHECK(objective_.stage && objective_.loss, "train: the objective needs both stage and loss");
  if (!where.device.is_cuda()) return;  // the CPU has no graphs: nothing to say
  std::string why_not;
  if (!o.cuda_graph) why_not = "--no-cuda-graph";
  else if (!device_graphs_supported(where.device)) why_not = "not supported on " + where.device.str();
  else why_not = graph_obstacle(o, model, scaler);
  use_graph_ = why_not.empty();
  if (o.quiet) return;
  if (use_graph_)
    log_ << "loom: CUDA graphs on: the forward and backward of a micro-batch are captured after " << kGraphWarmupSteps
         << " eager steps and replayed (--no-cuda-graph turns this off)\n";
  else
    log_ << "loom: CUDA graphs off (" << why_not << "): every step runs eagerly\n";
}

StepComputer::~StepComputer() = default;

// Device copies of the staged inputs: into the graph's static buffers, or into fresh tensors.
std::vector<Tensor> StepComputer::upload(const std::vector<Tensor>& staged, bool into_static) {
  if (uploads_.size() < staged.size()) uploads_.resize(staged.size());
  std::vector<Tensor> out(staged.size());
  for (size_t i = 0; i < staged.size(); ++i) {
    const Tensor& t = staged[i];
    if (!t.defined()) continue;
    if (!into_static && t.device() == where_.device) {
      out[i] = t;
      continue;
    }
    Tensor dst = into_static ? static_inputs_.at(i) : Tensor::empty(t.shape(), t.dtype(), where_.device);
    LOOM_CHECK(dst.defined() && dst.shape() == t.shape() && dst.dtype() == t.dtype(), "train (CUDA graph): input ", i,
               " of the micro-batch is ", t.str(), ", the captured step's was ",
               dst.defined() ? dst.str() : std::string("absent"), ": the shapes must stay the same");
    if (t.device().is_cpu()) {
      if (!uploads_[i]) uploads_[i] = std::make_unique<PinnedUpload>();
      uploads_[i]->copy(dst, t);
    } else {
      dst.copy_(t);  // already on the device: a device-to-device copy, stream-ordered
    }
    out[i] = dst;
  }
  return out;
}

// One micro-batch eagerly, from its staged inputs.
Tensor StepComputer::eager_micro(const std::vector<Tensor>& staged) {
  Variable loss = objective_.loss(upload(staged, false));
  if (grad_accum_ > 1) loss = loss * (1.0 / double(grad_accum_));
  (scaler_ ? scaler_->scale_loss(loss) : loss).backward();
  return loss.tensor();
}

// Captures loss and backward of one micro-batch with `staged` as its inputs. Returns false (after
// a one-line warning) when the capture fails; the gradients are then cleared.
bool StepComputer::capture(const std::vector<Tensor>& staged) {
  static_inputs_.assign(staged.size(), Tensor());
  for (size_t i = 0; i < staged.size(); ++i)
    if (staged[i].defined()) static_inputs_[i] = Tensor::empty(staged[i].shape(), staged[i].dtype(), where_.device);
  auto graph = std::make_unique<DeviceGraph>(where_.device);
  for (const auto& p : params_) p.zero_grad();  // the captured backward writes fresh gradients
  try {
    graph->capture([&] {
      Variable loss = objective_.loss(static_inputs_);
      if (grad_accum_ > 1) loss = loss * (1.0 / double(grad_accum_));
      loss.backward();
      captured_loss_ = loss.tensor();
    });
  } catch (const Error& e) {
    log_ << "loom: warning: CUDA graph capture failed, training on without graphs: " << first_line(e.what()) << "\n";
    for (const auto& p : params_) p.zero_grad();
    static_inputs_.clear(), captured_loss_ = Tensor(), use_graph_ = false;
    return false;
  }
  captured_grads_.clear();
  for (const auto& p : params_) captured_grads_.push_back(p.grad());
  graph_ = std::move(graph);
  return true;
}

// One micro-batch by replay: refill the inputs, replay, then take the loss (and, when
// accumulating, the gradients) out of the graph's buffers before the next replay rewrites them.
Tensor StepComputer::replay_micro(const std::vector<Tensor>& staged, int64_t a, std::vector<Tensor>& accumulated) {
  upload(staged, true);
  graph_->replay();
  ++replays_;
  const Tensor loss = captured_loss_.clone();
  if (grad_accum_ == 1) {
    for (size_t i = 0; i < params_.size(); ++i) params_[i].set_grad(captured_grads_[i]);
    return loss;
  }
  // As the eager backward accumulates: the first micro-batch's gradient, then slot + next.
  if (accumulated.empty()) accumulated.resize(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& g = captured_grads_[i];
    if (!g.defined()) continue;
    accumulated[i] = a == 0 || !accumulated[i].defined() ? g.clone() : ops::add(accumulated[i], g);
    params_[i].set_grad(accumulated[i]);
  }
  return loss;
}

Tensor StepComputer::run(int64_t step, int64_t steps_done,
                         const std::function<std::vector<int64_t>(int64_t)>& batch_of) {
  Tensor loss_sum;
  std::vector<Tensor> accumulated;
  for (int64_t a = 0; a < grad_accum_; ++a) {
    const int64_t micro = step * grad_accum_ + a;
    const std::vector<Tensor> staged = objective_.stage(batch_of(micro), micro);
    // Captured at the first micro-batch of a step only: the eager gradients of earlier
    // micro-batches of the step would be lost to the capture's fresh ones.
    const bool by_graph = use_graph_ && steps_done >= kGraphWarmupSteps && (graph_ || (a == 0 && capture(staged)));
    const Tensor loss = by_graph ? replay_micro(staged, a, accumulated) : eager_micro(staged);
    loss_sum = loss_sum.defined() ? ops::add(loss_sum, loss) : loss;
  }
  return loss_sum;
}

}  // namespace loom::trainer
