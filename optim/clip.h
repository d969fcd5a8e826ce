// Gradient-norm clipping: PyTorch's torch.nn.utils.clip_grad_norm_ (L2 norm,
// error_if_nonfinite = false).
#pragma once

#include <vector>

#include "autograd/variable.h"
#include "optim/optimizer.h"

namespace loom::optim {

// Returns the total L2 norm of all defined gradients of `params` (as if they
// were concatenated into one vector), measured before clipping; 0 when none
// has a gradient. Then, with coef = max_norm / (total + 1e-6):
//   * coef < 1 (total above max_norm): every gradient is multiplied by coef;
//   * coef >= 1: gradients are left as they are.
// Non-finite norms follow PyTorch (no error): a NaN total makes coef NaN and
// every gradient becomes NaN; an infinite total makes coef 0 (finite entries
// become 0, infinite ones NaN). The caller can test the returned norm with
// std::isfinite and skip the step.
// Scaled gradients replace the old grad tensors (set_grad); tensors a caller
// still holds are not modified. Undefined gradients are ignored. Norms of
// f16/bf16 gradients are accumulated in f32. Throws when max_norm < 0 or NaN.
double clip_grad_norm(const std::vector<Variable>& params, double max_norm);
double clip_grad_norm(const NamedParameters& params, double max_norm);

}  // namespace loom::optim
