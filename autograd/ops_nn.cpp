// Neural-network ops. layer_norm, group_norm and geglu call the device's fused
// slots (tensor/ops_fused.h) and record the fused backward; their *_composed
// forms, built from primitive ops (gradients by the chain rule), are the
// references the tests compare the fused ones with. dropout and mse_loss carry
// their own rules.
#include <vector>

#include "autograd/ops.h"
#include "tensor/ops.h"
#include "tensor/ops_fused.h"
#include "tensor/random.h"

namespace loom {

using GradList = std::vector<Tensor>;
using Needs = std::vector<bool>;

namespace {
// Normalises x over `dims`: (x − mean) / sqrt(var + eps), biased variance.
Variable normalize(const Variable& x, const std::vector<int64_t>& dims, double eps) {
  const Variable centered = sub(x, mean(x, dims, true));
  const Variable var = mean(mul(centered, centered), dims, true);
  return mul(centered, pow(add_scalar(var, eps), -0.5));
}
}  // namespace

namespace {
void check_layer_norm(const Variable& x, const Shape& normalized_shape, const Variable& weight, const Variable& bias) {
  LOOM_CHECK(x.defined(), "layer_norm: undefined input");
  const int64_t k = int64_t(normalized_shape.size());
  LOOM_CHECK(k >= 1 && x.dim() >= k && Shape(x.shape().end() - k, x.shape().end()) == normalized_shape,
             "layer_norm: input ", x.shape(), " does not end with normalized_shape ", normalized_shape);
  LOOM_CHECK(!weight.defined() || weight.shape() == normalized_shape, "layer_norm: weight ", weight.shape(),
             " does not match normalized_shape ", normalized_shape);
  LOOM_CHECK(!bias.defined() || bias.shape() == normalized_shape, "layer_norm: bias ", bias.shape(),
             " does not match normalized_shape ", normalized_shape);
}

void check_group_norm(const Variable& x, int64_t groups, const Variable& weight, const Variable& bias) {
  LOOM_CHECK(x.defined(), "group_norm: undefined input");
  LOOM_CHECK(x.dim() >= 2, "group_norm: input must be [N, C, *], got ", x.shape());
  const int64_t c = x.size(1);
  LOOM_CHECK(groups > 0 && c % groups == 0, "group_norm: ", c, " channels cannot be split into ", groups, " groups");
  LOOM_CHECK(!weight.defined() || weight.shape() == Shape{c}, "group_norm: weight ", weight.shape(),
             " does not match channels [", c, "]");
  LOOM_CHECK(!bias.defined() || bias.shape() == Shape{c}, "group_norm: bias ", bias.shape(),
             " does not match channels [", c, "]");
}

Tensor tensor_or_none(const Variable& v) { return v.defined() ? v.tensor() : Tensor(); }
}  // namespace

Variable layer_norm(const Variable& x, const Shape& normalized_shape, const Variable& weight, const Variable& bias,
                    double eps) {
  check_layer_norm(x, normalized_shape, weight, bias);
  const int64_t n = shape_numel(normalized_shape);
  const Tensor xt = x.tensor(), wt = tensor_or_none(weight);
  const ops::NormForward f = ops::layer_norm(xt, n, wt, tensor_or_none(bias), eps);
  const Tensor mean = f.mean, rstd = f.rstd;
  return record("layer_norm", f.y, {x, weight, bias}, [xt, wt, mean, rstd, n](const Tensor& g, const Needs& needs) {
    const ops::NormGrads d = ops::layer_norm_backward(g, xt, n, wt, mean, rstd, {needs[0], needs[1], needs[2]});
    return GradList{d.dx, d.dweight, d.dbias};
  });
}

std::pair<Variable, Variable> add_layer_norm(const Variable& x, const Variable& residual, const Shape& normalized_shape,
                                             const Variable& weight, const Variable& bias, double eps) {
  check_layer_norm(x, normalized_shape, weight, bias);
  LOOM_CHECK(residual.defined() && residual.shape() == x.shape(), "add_layer_norm: residual ",
             residual.defined() ? residual.shape() : Shape{}, " does not match the input ", x.shape());
  const int64_t n = shape_numel(normalized_shape);
  const Tensor wt = tensor_or_none(weight);
  const ops::NormForward f = ops::layer_norm(x.tensor(), n, wt, tensor_or_none(bias), eps, residual.tensor());
  const Variable s = record("add", f.sum, {x, residual}, [](const Tensor& g, const Needs& needs) {
    return GradList{needs[0] ? g : Tensor(), needs[1] ? g : Tensor()};
  });
  const Tensor st = f.sum, mean = f.mean, rstd = f.rstd;
  const Variable y =
      record("layer_norm", f.y, {s, weight, bias}, [st, wt, mean, rstd, n](const Tensor& g, const Needs& needs) {
        const ops::NormGrads d = ops::layer_norm_backward(g, st, n, wt, mean, rstd, {needs[0], needs[1], needs[2]});
        return GradList{d.dx, d.dweight, d.dbias};
      });
  return {s, y};
}

Variable group_norm(const Variable& x, int64_t groups, const Variable& weight, const Variable& bias, double eps) {
  check_group_norm(x, groups, weight, bias);
  const Tensor xt = x.tensor(), wt = tensor_or_none(weight);
  const ops::NormForward f = ops::group_norm(xt, groups, wt, tensor_or_none(bias), eps);
  const Tensor mean = f.mean, rstd = f.rstd;
  return record("group_norm", f.y, {x, weight, bias},
                [xt, wt, mean, rstd, groups](const Tensor& g, const Needs& needs) {
                  const ops::NormGrads d =
                      ops::group_norm_backward(g, xt, groups, wt, mean, rstd, {needs[0], needs[1], needs[2]});
                  return GradList{d.dx, d.dweight, d.dbias};
                });
}

Variable group_norm_silu(const Variable& x, int64_t groups, const Variable& weight, const Variable& bias,
                         double eps, const Variable& shift) {
  check_group_norm(x, groups, weight, bias);
  LOOM_CHECK(!shift.defined() || shift.shape() == Shape({x.size(0), x.size(1)}), "group_norm_silu: shift ",
             shift.shape(), " must be [", x.size(0), ", ", x.size(1), "] for input ", x.shape());
  if (records_gradient({x, weight, bias, shift})) {
    Variable u = x;
    if (shift.defined()) {  // [N, C] -> [N, C, 1, ...] broadcast over the spatial dims
      Shape s(size_t(x.dim()), 1);
      s[0] = x.size(0), s[1] = x.size(1);
      u = add(x, reshape(shift, s));
    }
    return silu(group_norm(u, groups, weight, bias, eps));
  }
  return Variable(ops::group_norm(x.tensor(), groups, tensor_or_none(weight), tensor_or_none(bias), eps, true,
                                  tensor_or_none(shift))
                      .y);
}

Variable geglu(const Variable& x, bool tanh_approx) {
  LOOM_CHECK(x.defined(), "geglu: undefined input");
  const Tensor xt = x.tensor();
  return record("geglu", ops::geglu(xt, tanh_approx), {x}, [xt, tanh_approx](const Tensor& g, const Needs&) {
    return GradList{ops::geglu_backward(g, xt, tanh_approx)};
  });
}

Variable linear_geglu(const Variable& x, const Variable& w, const Variable& bias) {
  if (records_gradient({x, w, bias})) return geglu(linear(x, w, bias));
  LOOM_CHECK(x.defined() && w.defined(), "linear_geglu: undefined input or weight");
  return Variable(ops::linear_geglu(x.tensor(), w.tensor(), tensor_or_none(bias)));
}

Variable bias_residual(const Variable& y, const Variable& bias, const Variable& residual, int64_t dim) {
  LOOM_CHECK(y.defined() && residual.defined(), "bias_residual: undefined input");
  LOOM_CHECK(y.dim() >= 1 && dim >= -y.dim() && dim < y.dim(), "bias_residual: dim ", dim,
             " is out of range for ", y.shape());
  const int64_t d = dim < 0 ? dim + y.dim() : dim, n = y.size(d);
  LOOM_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == n), "bias_residual: bias ",
             bias.defined() ? bias.shape() : Shape{}, " does not match dim ", d, " of ", y.shape());
  int64_t inner = 1;
  for (int64_t k = d + 1; k < y.dim(); ++k) inner *= y.size(k);
  return record("bias_residual", ops::bias_residual(y.tensor(), tensor_or_none(bias), residual.tensor(), d),
                {y, bias, residual}, [n, inner](const Tensor& g, const Needs& needs) {
                  // dy = g, dresidual = g, dbias = Σ of g over every dim but the bias's
                  const Tensor db = needs[1] ? inner == 1 ? ops::sum(g.reshape({-1, n}), {0})
                                                          : ops::sum(g.reshape({-1, n, inner}), {0, 2})
                                             : Tensor();
                  return GradList{needs[0] ? g : Tensor(), db, needs[2] ? g : Tensor()};
                });
}

Variable layer_norm_composed(const Variable& x, const Shape& normalized_shape, const Variable& weight,
                             const Variable& bias, double eps) {
  check_layer_norm(x, normalized_shape, weight, bias);
  const int64_t k = int64_t(normalized_shape.size());
  std::vector<int64_t> dims;
  for (int64_t d = x.dim() - k; d < x.dim(); ++d) dims.push_back(d);
  Variable y = normalize(x, dims, eps);
  if (weight.defined()) y = mul(y, weight);
  if (bias.defined()) y = add(y, bias);
  return y;
}

Variable group_norm_composed(const Variable& x, int64_t groups, const Variable& weight, const Variable& bias,
                             double eps) {
  check_group_norm(x, groups, weight, bias);
  const int64_t n = x.size(0), c = x.size(1);
  // [N, C, *] -> [N, G, C/G · Π*], normalise the last dim, back to [N, C, *].
  Variable y = reshape(normalize(reshape(x, {n, groups, -1}), {2}, eps), x.shape());
  Shape per_channel(size_t(x.dim()), 1);  // [1, C, 1, ...] broadcasts over N and the spatial dims
  per_channel[1] = c;
  if (weight.defined()) y = mul(y, reshape(weight, per_channel));
  if (bias.defined()) y = add(y, reshape(bias, per_channel));
  return y;
}

Variable geglu_composed(const Variable& x, bool tanh_approx) {
  LOOM_CHECK(x.defined() && x.dim() >= 1 && x.size(-1) % 2 == 0, "geglu: the last dim of ",
             x.defined() ? x.shape() : Shape{}, " must be even (the two halves h and g)");
  const std::vector<Variable> hg = chunk(x, 2, -1);  // [..., 2h] -> 2 × [..., h]
  return mul(hg[0], gelu(hg[1], tanh_approx));
}

Variable dropout(const Variable& x, double p, bool training, Generator& gen) {
  LOOM_CHECK(p >= 0.0 && p < 1.0, "dropout: probability must be in [0, 1), got ", p);
  if (!training || p == 0.0) return x;
  // The mask is drawn on x's device by the counter-based generator (tensor/random.h), keyed by
  // one word of `gen`: the same seed drops the same elements on every device, with no host copy.
  const Tensor mask = random_dropout_mask(x.shape(), x.dtype(), x.device(), p, gen.next_u64());
  return record("dropout", ops::mul(x.tensor(), mask), {x},
                [mask](const Tensor& g, const Needs&) { return GradList{ops::mul(g, mask)}; });
}

Variable mse_loss(const Variable& pred, const Variable& target) {
  LOOM_CHECK(pred.defined() && target.defined(), "mse_loss: undefined input");
  LOOM_CHECK(pred.shape() == target.shape(), "mse_loss: prediction ", pred.shape(), " and target ", target.shape(),
             " differ in shape");
  const Tensor diff = ops::sub(pred.tensor(), target.tensor());
  const double n = double(pred.numel());
  return record("mse_loss", ops::mean(ops::square(diff)), {pred, target},
                [diff, n](const Tensor& g, const Needs& needs) {
                  const Tensor gp = ops::mul(ops::mul_scalar(diff, 2.0 / n), g);  // 2(p − t)/N · g
                  return GradList{needs[0] ? gp : Tensor(), needs[1] ? ops::neg(gp) : Tensor()};
                });
}

}  // namespace loom
