// Elementwise ops: forward and gradient rule side by side.
#include "autograd/ops.h"
#include "tensor/ops.h"

namespace loom {

using GradList = std::vector<Tensor>;
using Needs = std::vector<bool>;

Variable add(const Variable& a, const Variable& b) {
  return record("add", ops::add(a.tensor(), b.tensor()), {a, b},
                [](const Tensor& g, const Needs&) { return GradList{g, g}; });
}

Variable sub(const Variable& a, const Variable& b) {
  return record("sub", ops::sub(a.tensor(), b.tensor()), {a, b}, [](const Tensor& g, const Needs& needs) {
    return GradList{g, needs[1] ? ops::neg(g) : Tensor()};
  });
}

Variable mul(const Variable& a, const Variable& b) {
  const Tensor ta = a.tensor(), tb = b.tensor();
  // Save only the operand each needed gradient reads.
  const Tensor save_a = b.requires_grad() ? ta : Tensor(), save_b = a.requires_grad() ? tb : Tensor();
  return record("mul", ops::mul(ta, tb), {a, b}, [save_a, save_b](const Tensor& g, const Needs& needs) {
    return GradList{needs[0] ? ops::mul(g, save_b) : Tensor(), needs[1] ? ops::mul(g, save_a) : Tensor()};
  });
}

Variable div(const Variable& a, const Variable& b) {
  const Tensor tb = b.tensor();
  const Tensor out = ops::div(a.tensor(), tb);
  const Tensor save_out = b.requires_grad() ? out : Tensor();
  return record("div", out, {a, b}, [tb, save_out](const Tensor& g, const Needs& needs) {
    const Tensor ga = ops::div(g, tb);  // ∂/∂a = g / b
    return GradList{needs[0] ? ga : Tensor(), needs[1] ? ops::neg(ops::mul(ga, save_out)) : Tensor()};
  });
}

Variable neg(const Variable& x) {
  return record("neg", ops::neg(x.tensor()), {x}, [](const Tensor& g, const Needs&) { return GradList{ops::neg(g)}; });
}

Variable add_scalar(const Variable& x, double s) {
  return record("add_scalar", ops::add_scalar(x.tensor(), s), {x},
                [](const Tensor& g, const Needs&) { return GradList{g}; });
}

Variable mul_scalar(const Variable& x, double s) {
  return record("mul_scalar", ops::mul_scalar(x.tensor(), s), {x},
                [s](const Tensor& g, const Needs&) { return GradList{ops::mul_scalar(g, s)}; });
}

Variable rsub_scalar(double s, const Variable& x) {
  return record("rsub_scalar", ops::add_scalar(ops::neg(x.tensor()), s), {x},
                [](const Tensor& g, const Needs&) { return GradList{ops::neg(g)}; });
}

Variable rdiv_scalar(double s, const Variable& x) {
  const Tensor tx = x.tensor();
  const Tensor out = ops::mul_scalar(ops::reciprocal(tx), s);
  return record("rdiv_scalar", out, {x}, [tx, out](const Tensor& g, const Needs&) {
    return GradList{ops::neg(ops::div(ops::mul(g, out), tx))};  // −s/x² = −out/x
  });
}

Variable exp(const Variable& x) {
  const Tensor out = ops::exp(x.tensor());
  return record("exp", out, {x}, [out](const Tensor& g, const Needs&) { return GradList{ops::mul(g, out)}; });
}

Variable log(const Variable& x) {
  const Tensor tx = x.tensor();
  return record("log", ops::log(tx), {x}, [tx](const Tensor& g, const Needs&) { return GradList{ops::div(g, tx)}; });
}

Variable sqrt(const Variable& x) {
  const Tensor out = ops::sqrt(x.tensor());
  return record("sqrt", out, {x}, [out](const Tensor& g, const Needs&) {
    return GradList{ops::div(ops::mul_scalar(g, 0.5), out)};
  });
}

Variable pow(const Variable& x, double p) {
  const Tensor tx = x.tensor();
  return record("pow", ops::pow_scalar(tx, p), {x}, [tx, p](const Tensor& g, const Needs&) {
    return GradList{ops::mul(g, ops::mul_scalar(ops::pow_scalar(tx, p - 1.0), p))};
  });
}

Variable tanh(const Variable& x) {
  const Tensor out = ops::tanh(x.tensor());
  return record("tanh", out, {x}, [out](const Tensor& g, const Needs&) {
    return GradList{ops::mul(g, ops::add_scalar(ops::neg(ops::square(out)), 1.0))};  // 1 − y²
  });
}

Variable sigmoid(const Variable& x) {
  const Tensor out = ops::sigmoid(x.tensor());
  return record("sigmoid", out, {x}, [out](const Tensor& g, const Needs&) {
    return GradList{ops::mul(g, ops::mul(out, ops::add_scalar(ops::neg(out), 1.0)))};  // y(1 − y)
  });
}

Variable relu(const Variable& x) {
  const Tensor tx = x.tensor();
  return record("relu", ops::relu(tx), {x},
                [tx](const Tensor& g, const Needs&) { return GradList{ops::mul(g, ops::step(tx))}; });
}

Variable gelu(const Variable& x, bool tanh_approx) {
  const Tensor tx = x.tensor();
  return record(tanh_approx ? "gelu_tanh" : "gelu", ops::gelu(tx, tanh_approx), {x},
                [tx, tanh_approx](const Tensor& g, const Needs&) {
                  return GradList{ops::mul(g, ops::gelu_grad(tx, tanh_approx))};
                });
}

}  // namespace loom
