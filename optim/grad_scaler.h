// Dynamic loss scaling for f16 training (SPEC §7), with the semantics of PyTorch's
// torch.cuda.amp.GradScaler (and so of diffusers' training scripts):
//   - the loss is multiplied by scale() before backward (scale_loss);
//   - unscale() multiplies every gradient by 1/scale in place and checks them for inf/nan in one
//     fused device op (ops::unscale_check_finite, the flag kept on the device), then reads the
//     one flag: the caller skips the optimizer step when it is set (so optimizer state is
//     untouched by a skipped step);
//   - update(found_inf): a non-finite step multiplies the scale by backoff_factor (0.5) and
//     restarts the count; growth_interval (2000) consecutive finite steps multiply it by
//     growth_factor (2).
// The state (scale, growth tracker) round-trips through state_dict() for checkpoints.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "autograd/variable.h"

namespace loom::optim {

struct GradScalerOptions {
  double init_scale = 65536.0;  // 2^16
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
};

class GradScaler {
 public:
  explicit GradScaler(GradScalerOptions options = {});

  double scale() const { return scale_; }
  int64_t growth_tracker() const { return growth_tracker_; }
  const GradScalerOptions& options() const { return options_; }

  // loss · scale (recorded, so backward yields scaled gradients).
  Variable scale_loss(const Variable& loss) const;

  // Divides the gradients of `params` by scale() in place (undefined gradients are skipped;
  // a gradient that shares its memory with another tensor is copied first, so nothing else
  // changes) and returns whether any held an inf or nan before. One fused call per dtype and
  // one 4-byte device-to-host read.
  bool unscale(const std::vector<Variable>& params) const;

  // Adjusts the scale after a step (found_inf: the step's gradients were not finite).
  void update(bool found_inf);

  // {"scale": [1] f64, "growth_tracker": [1] f64} on the CPU; load_state_dict checks both.
  std::map<std::string, Tensor> state_dict() const;
  void load_state_dict(const std::map<std::string, Tensor>& state);

 private:
  GradScalerOptions options_;
  double scale_;
  int64_t growth_tracker_ = 0;
};

}  // namespace loom::optim
