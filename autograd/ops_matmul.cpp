// Matrix products: forward and gradient rule side by side.
#include "autograd/ops.h"
#include "tensor/ops.h"
#include "tensor/ops_fused.h"

namespace loom {

using GradList = std::vector<Tensor>;
using Needs = std::vector<bool>;

Variable matmul(const Variable& a, const Variable& b) {
  LOOM_CHECK(a.defined() && b.defined(), "matmul: undefined variable");
  // 1-D operands: promote to matrices with differentiable reshapes, as NumPy does.
  if (a.dim() == 1) return squeeze(matmul(unsqueeze(a, 0), b), -2);
  if (b.dim() == 1) return squeeze(matmul(a, unsqueeze(b, 1)), -1);
  const Tensor ta = a.tensor(), tb = b.tensor();
  const Tensor save_a = b.requires_grad() ? ta : Tensor(), save_b = a.requires_grad() ? tb : Tensor();
  return record("matmul", ops::matmul(ta, tb), {a, b}, [save_a, save_b](const Tensor& g, const Needs& needs) {
    // g [batch, m, n]:  dA = g·Bᵀ [batch, m, k],  dB = Aᵀ·g [batch, k, n]; the engine sums broadcast batches.
    return GradList{needs[0] ? ops::matmul(g, save_b.transpose(-1, -2)) : Tensor(),
                    needs[1] ? ops::matmul(save_a.transpose(-1, -2), g) : Tensor()};
  });
}

Variable linear(const Variable& x, const Variable& w, const Variable& bias) {
  const Tensor tx = x.tensor(), tw = w.tensor();
  const Tensor y = ops::linear(tx, tw, bias.defined() ? bias.tensor() : Tensor());
  std::vector<Variable> inputs{x, w};
  if (bias.defined()) inputs.push_back(bias);
  const Tensor save_x = w.requires_grad() ? tx : Tensor(), save_w = x.requires_grad() ? tw : Tensor();
  return record("linear", y, inputs, [save_x, save_w](const Tensor& g, const Needs& needs) {
    const int64_t out = g.size(-1);
    GradList grads(needs.size());
    if (needs[0]) grads[0] = ops::matmul(g, save_w);  // [..., out] x [out, in] -> [..., in]
    if (needs[1]) {                                    // [out, N] x [N, in] -> [out, in]
      const Tensor g2 = g.reshape({-1, out}), x2 = save_x.reshape({-1, save_x.size(-1)});
      grads[1] = ops::matmul(g2.transpose(0, 1), x2);
    }
    if (needs.size() > 2 && needs[2]) grads[2] = ops::sum(g.reshape({-1, out}), {0});  // [out]
    return grads;
  });
}

namespace {

// add_linear's node: y + alpha·(x·wᵀ) computed as `out` (a copy of y or y itself).
Variable record_add_linear(Tensor out, const Variable& y, const Variable& x, const Variable& w, double alpha) {
  const Tensor tx = x.tensor(), tw = w.tensor();
  const Tensor save_x = w.requires_grad() ? tx : Tensor(), save_w = x.requires_grad() ? tw : Tensor();
  return record("add_linear", std::move(out), {y, x, w},
                [save_x, save_w, alpha](const Tensor& g, const Needs& needs) {
                  const int64_t out = g.size(-1);
                  GradList grads(3);
                  if (needs[0]) grads[0] = g;
                  if (needs[1]) grads[1] = ops::mul_scalar(ops::matmul(g, save_w), alpha);  // [..., out]·[out, in]
                  if (needs[2]) {  // α·[out, N] x [N, in] -> [out, in]
                    const Tensor g2 = g.reshape({-1, out}), x2 = save_x.reshape({-1, save_x.size(-1)});
                    grads[2] = ops::mul_scalar(ops::matmul(g2.transpose(0, 1), x2), alpha);
                  }
                  return grads;
                });
}

}  // namespace

Variable add_linear(const Variable& y, const Variable& x, const Variable& w, double alpha) {
  LOOM_CHECK(y.defined() && x.defined() && w.defined(), "add_linear: undefined variable");
  return record_add_linear(ops::add_linear(y.tensor(), x.tensor(), w.tensor(), alpha), y, x, w, alpha);
}

Variable add_linear(Variable&& y, const Variable& x, const Variable& w, double alpha) {
  LOOM_CHECK(y.defined() && x.defined() && w.defined(), "add_linear: undefined variable");
  // Only this reference reaches y's Variable, and only y's Variable its storage: nobody can read
  // the old values after this call.
  const bool sole = y.impl().use_count() == 1 && y.tensor().storage().use_count() == 1 &&
                    y.tensor().is_contiguous() && !(y.is_leaf() && y.requires_grad());
  if (!sole) return add_linear(static_cast<const Variable&>(y), x, w, alpha);
  const Variable given = std::move(y);
  y = Variable();
  Tensor out = given.tensor();  // shares the storage: now two handles, both ours
  ops::add_linear_into(out, x.tensor(), w.tensor(), alpha);
  return record_add_linear(std::move(out), given, x, w, alpha);
}

}  // namespace loom
