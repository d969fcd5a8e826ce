#include "optim/grad_scaler.h"

#include <cmath>

#include "autograd/ops.h"
#include "tensor/ops_fused.h"

namespace loom::optim {

GradScaler::GradScaler(GradScalerOptions options) : options_(options), scale_(options.init_scale) {
  LOOM_CHECK(std::isfinite(options.init_scale) && options.init_scale > 0, "GradScaler: init_scale must be > 0, got ",
             options.init_scale);
  LOOM_CHECK(options.growth_factor > 1, "GradScaler: growth_factor must be > 1, got ", options.growth_factor);
  LOOM_CHECK(options.backoff_factor > 0 && options.backoff_factor < 1,
             "GradScaler: backoff_factor must be in (0, 1), got ", options.backoff_factor);
  LOOM_CHECK(options.growth_interval > 0, "GradScaler: growth_interval must be > 0, got ", options.growth_interval);
}

Variable GradScaler::scale_loss(const Variable& loss) const { return loss * scale_; }

bool GradScaler::unscale(const std::vector<Variable>& params) const {
  std::vector<Tensor> grads;
  Device device = Device::cpu();
  for (const Variable& p : params) {
    Tensor g = p.grad();
    if (!g.defined()) continue;
    // In place only on memory this gradient owns alone (the engine may hand one tensor to
    // several leaves, or keep views): otherwise a private copy replaces it.
    if (!g.is_contiguous() || g.storage().use_count() > 2) {  // 2: the Variable's and `g`
      g = g.clone();
      p.set_grad(g);
    }
    if (grads.empty()) device = g.device();
    LOOM_CHECK(g.device() == device, "GradScaler::unscale: gradients on ", device, " and ", g.device());
    grads.push_back(g);
  }
  if (grads.empty()) return false;
  const Tensor found_inf = Tensor::zeros({1}, DType::F32, device);
  ops::unscale_check_finite(grads, found_inf, 1.0 / scale_);
  return found_inf.item() != 0.0;  // the one read of the step
}

void GradScaler::update(bool found_inf) {
  if (found_inf) {
    scale_ *= options_.backoff_factor;
    growth_tracker_ = 0;
    return;
  }
  if (++growth_tracker_ == options_.growth_interval) {
    const double grown = scale_ * options_.growth_factor;
    if (std::isfinite(grown)) scale_ = grown;  // as PyTorch: never grow to inf
    growth_tracker_ = 0;
  }
}

std::map<std::string, Tensor> GradScaler::state_dict() const {
  return {{"scale", Tensor::from_values({scale_}, {1}, DType::F64)},
          {"growth_tracker", Tensor::from_values({double(growth_tracker_)}, {1}, DType::F64)}};
}

void GradScaler::load_state_dict(const std::map<std::string, Tensor>& state) {
  auto value = [&](const char* key) {
    auto it = state.find(key);
    LOOM_CHECK(it != state.end(), "GradScaler.load_state_dict: missing '", key, "'");
    LOOM_CHECK(it->second.defined() && it->second.numel() == 1, "GradScaler.load_state_dict: '", key,
               "' must hold one value, got ", it->second.defined() ? it->second.str() : "undefined");
    return it->second.item();
  };
  const double scale = value("scale"), tracker = value("growth_tracker");
  LOOM_CHECK(std::isfinite(scale) && scale > 0, "GradScaler.load_state_dict: scale must be > 0, got ", scale);
  LOOM_CHECK(tracker >= 0 && tracker < double(options_.growth_interval) && tracker == std::floor(tracker),
             "GradScaler.load_state_dict: growth_tracker must be an integer in [0, ", options_.growth_interval,
             "), got ", tracker);
  scale_ = scale;
  growth_tracker_ = int64_t(tracker);
}

}  // namespace loom::optim
