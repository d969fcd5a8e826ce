// Shared by the fused-op tests (tests/autograd/test_fused_ops.cpp, tests/optim/
// test_fused_update.cpp, tests/gpu/test_gpu_fused.cpp): relative error, random
// inputs, and the composed references the fused slots are compared with.
//
//   * rel_error(x, ref) = ||x − ref|| / ||ref|| over all elements (in double).
//   * random_tensor(shape, gen, dtype, device): standard normal values drawn in
//     f64 on the host, identical for identical generator state on every device.
//   * The optimizer reference is optim/'s former per-tensor op chain, op for op
//     (tensor/ops.h), kept here to check that the fused update reproduces it.
#pragma once

#include <cmath>
#include <vector>

#include "tensor/fused_args.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tensor/tensor.h"

namespace loom::test {

inline double rel_error(const Tensor& x, const Tensor& ref) {
  const std::vector<double> a = x.to_vector(), b = ref.to_vector();
  if (a.size() != b.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  if (!std::isfinite(num)) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

inline Tensor random_tensor(const Shape& shape, Generator& gen, DType dtype = DType::F64,
                            Device device = Device::cpu(), double mean = 0.0, double std = 1.0) {
  std::vector<double> v(size_t(shape_numel(shape)));
  for (double& x : v) x = mean + std * gen.normal();
  return Tensor::from_values(v, shape, dtype, device);
}

// optim/'s former SGD / Adam / AdamW update of one tensor, op by op; updates
// e.param and the state tensors of `e` (replacing them) like the fused slot does in place.
inline void reference_update(const OptimizerUpdateArgs& a, OptimizerTensor& e) {
  Tensor p = e.param, g = e.grad;
  if (a.kind == OptimizerKind::Sgd) {
    Tensor d = g;
    if (a.weight_decay != 0) d = ops::add(d, ops::mul_scalar(p, a.weight_decay));
    if (a.momentum != 0) {
      e.state1 = e.first ? d.clone()
                         : ops::add(ops::mul_scalar(e.state1, a.momentum), ops::mul_scalar(d, 1.0 - a.dampening));
      d = a.nesterov ? ops::add(d, ops::mul_scalar(e.state1, a.momentum)) : e.state1;
    }
    e.param = ops::sub(p, ops::mul_scalar(d, a.lr));
    return;
  }
  const bool decoupled = a.kind == OptimizerKind::AdamW;
  if (a.weight_decay != 0 && decoupled) p = ops::mul_scalar(p, 1.0 - a.lr * a.weight_decay);
  if (a.weight_decay != 0 && !decoupled) g = ops::add(g, ops::mul_scalar(p, a.weight_decay));
  e.state1 = ops::add(ops::mul_scalar(e.state1, a.beta1), ops::mul_scalar(g, 1.0 - a.beta1));
  e.state2 = ops::add(ops::mul_scalar(e.state2, a.beta2), ops::mul_scalar(ops::square(g), 1.0 - a.beta2));
  const Tensor denom = ops::add_scalar(ops::mul_scalar(ops::sqrt(e.state2), e.inv_bias2_sqrt), a.eps);
  e.param = ops::sub(p, ops::mul_scalar(ops::div(e.state1, denom), e.step_size));
}

}  // namespace loom::test
