// f64 gradient check by central differences. Compares, for every output
// element j and every element i of every input that requires grad, the
// analytic ∂out_j/∂in_i (one backward per output element) with
// (f(in_i + eps) − f(in_i − eps)) / 2eps. Passes when
// |analytic − numeric| ≤ atol + rtol·|numeric| everywhere.
//
// Inputs must be f64 CPU leaves; they may be non-contiguous views (a transpose,
// a slice) but not expanded (stride 0), since perturbing one stored element
// would then move several logical ones.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "autograd/variable.h"

namespace loom {

struct GradcheckOptions {
  double eps = 1e-6;
  double atol = 1e-5;
  double rtol = 1e-3;
};

struct GradcheckResult {
  bool ok = false;
  std::string message;  // first mismatch, or a summary on success
  double max_abs_error = 0.0;
  int64_t entries_checked = 0;
};

using GradcheckFn = std::function<Variable(const std::vector<Variable>&)>;

GradcheckResult gradcheck(const GradcheckFn& fn, const std::vector<Variable>& inputs,
                          const GradcheckOptions& options = {});

}  // namespace loom
