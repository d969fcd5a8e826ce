// Host side of the fused slots: checks, contiguity, output allocation, one
// backend call (contracts in tensor/ops_fused.h and tensor/fused_args.h).
#include "tensor/ops_fused.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <utility>

#include "tensor/ops.h"

namespace loom::ops {

namespace {

// The dtype that statistics are kept in for storage dtype t.
DType stat_dtype(DType t) { return t == DType::F64 ? DType::F64 : DType::F32; }

void check_input(const char* op, const Tensor& x) {
  LOOM_CHECK(x.defined(), op, ": undefined input");
  LOOM_CHECK(is_floating(x.dtype()), op, ": input ", x.str(), " is not a floating-point tensor");
}

// An optional per-feature tensor (weight / bias / saved statistics): undefined, or
// `numel` elements on x's device in `dtype`; returned contiguous.
Tensor check_vector(const char* op, const char* what, const Tensor& t, const Tensor& x, int64_t numel, DType dtype) {
  if (!t.defined()) return t;
  LOOM_CHECK(t.device() == x.device(), op, ": ", what, " ", t.str(), " is not on the input's device ", x.device());
  LOOM_CHECK(t.dtype() == dtype, op, ": ", what, " ", t.str(), " must have dtype ", dtype);
  LOOM_CHECK(t.numel() == numel, op, ": ", what, " ", t.str(), " must have ", numel, " elements");
  return t.contiguous();
}

// dy must match y = f(x): the shape `shape`, x's dtype and device.
Tensor check_grad(const char* op, const Tensor& dy, const Tensor& x, const Shape& shape) {
  LOOM_CHECK(dy.defined(), op, ": undefined output gradient");
  LOOM_CHECK(dy.device() == x.device() && dy.dtype() == x.dtype() && dy.shape() == shape, op,
             ": output gradient ", dy.str(), " does not match the output (", x.dtype(), ", ", x.device(), ", ",
             shape, ")");
  return dy.contiguous();
}

Tensor empty_like_or_none(bool needed, const Tensor& like) {
  return needed ? Tensor::empty(like.shape(), like.dtype(), like.device()) : Tensor();
}

Tensor empty_vector_or_none(bool needed, const Tensor& weight, const Tensor& x, int64_t n) {
  if (!needed) return Tensor();
  return weight.defined() ? Tensor::empty(weight.shape(), weight.dtype(), weight.device())
                          : Tensor::empty({n}, x.dtype(), x.device());
}

// [N, C, S] view parameters of a group-norm input [N, C, *].
struct GroupShape {
  int64_t batch, channels, spatial;
};
GroupShape group_shape(const char* op, const Tensor& x, int64_t groups) {
  LOOM_CHECK(x.dim() >= 2, op, ": input must be [N, C, *], got ", x.shape());
  const int64_t c = x.size(1);
  LOOM_CHECK(groups > 0 && c % groups == 0, op, ": ", c, " channels cannot be split into ", groups, " groups");
  const int64_t n = x.size(0);
  const int64_t s = n * c == 0 ? 0 : x.numel() / (n * c);
  return {n, c, s};
}

}  // namespace

// ---- layer norm ------------------------------------------------------------------------

NormForward layer_norm(const Tensor& x_in, int64_t n, const Tensor& weight, const Tensor& bias, double eps,
                       const Tensor& residual) {
  check_input("layer_norm", x_in);
  LOOM_CHECK(n > 0 && x_in.numel() % n == 0, "layer_norm: input ", x_in.shape(),
             " cannot be viewed as rows of ", n, " normalized elements");
  LOOM_CHECK(eps >= 0, "layer_norm: eps must be >= 0, got ", eps);
  Backend& be = backend_for("layer_norm", OpKind::LayerNorm, x_in.device(), x_in.dtype());
  LayerNormArgs a;
  a.x = x_in.contiguous();
  a.weight = check_vector("layer_norm", "weight", weight, x_in, n, x_in.dtype());
  a.bias = check_vector("layer_norm", "bias", bias, x_in, n, x_in.dtype());
  if (residual.defined()) {
    LOOM_CHECK(residual.shape() == x_in.shape() && residual.dtype() == x_in.dtype() &&
                   residual.device() == x_in.device(),
               "layer_norm: residual ", residual.str(), " does not match the input ", x_in.str());
    a.residual = residual.contiguous();
    a.sum = Tensor::empty(x_in.shape(), x_in.dtype(), x_in.device());
  }
  a.rows = x_in.numel() / n;
  a.n = n;
  a.eps = eps;
  a.y = Tensor::empty(x_in.shape(), x_in.dtype(), x_in.device());
  a.mean = Tensor::empty({a.rows}, stat_dtype(x_in.dtype()), x_in.device());
  a.rstd = Tensor::empty({a.rows}, stat_dtype(x_in.dtype()), x_in.device());
  if (a.rows > 0) be.layer_norm(a);
  return {a.y, a.mean, a.rstd, a.sum};
}

NormGrads layer_norm_backward(const Tensor& dy, const Tensor& x, int64_t n, const Tensor& weight,
                              const Tensor& mean, const Tensor& rstd, NormNeeds needs) {
  check_input("layer_norm_backward", x);
  LOOM_CHECK(n > 0 && x.numel() % n == 0, "layer_norm_backward: input ", x.shape(),
             " cannot be viewed as rows of ", n, " normalized elements");
  Backend& be = backend_for("layer_norm_backward", OpKind::LayerNorm, x.device(), x.dtype());
  LayerNormGradArgs a;
  a.rows = x.numel() / n;
  a.n = n;
  a.dy = check_grad("layer_norm_backward", dy, x, x.shape());
  a.x = x.contiguous();
  a.weight = check_vector("layer_norm_backward", "weight", weight, x, n, x.dtype());
  a.mean = check_vector("layer_norm_backward", "mean", mean, x, a.rows, stat_dtype(x.dtype()));
  a.rstd = check_vector("layer_norm_backward", "rstd", rstd, x, a.rows, stat_dtype(x.dtype()));
  LOOM_CHECK(a.mean.defined() && a.rstd.defined(), "layer_norm_backward: the saved mean and rstd are required");
  a.dx = empty_like_or_none(needs.dx, x);
  a.dweight = empty_vector_or_none(needs.dweight, weight, x, n);
  a.dbias = empty_vector_or_none(needs.dbias, weight, x, n);
  if (a.rows == 0) {  // nothing normalised: the parameter gradients are zero
    if (a.dweight.defined()) a.dweight.fill_(0.0);
    if (a.dbias.defined()) a.dbias.fill_(0.0);
  } else if (a.dx.defined() || a.dweight.defined() || a.dbias.defined()) {
    be.layer_norm_backward(a);
  }
  return {a.dx, a.dweight, a.dbias};
}

// ---- group norm ------------------------------------------------------------------------

namespace {
NormForward group_norm_impl(const Tensor& x_in, int64_t groups, const Tensor& weight, const Tensor& bias, double eps,
                            bool silu, const Tensor& shift, bool statistics_only) {
  check_input("group_norm", x_in);
  const GroupShape s = group_shape("group_norm", x_in, groups);
  LOOM_CHECK(eps >= 0, "group_norm: eps must be >= 0, got ", eps);
  Backend& be = backend_for("group_norm", OpKind::GroupNorm, x_in.device(), x_in.dtype());
  GroupNormArgs a;
  a.x = x_in.contiguous();
  a.weight = check_vector("group_norm", "weight", weight, x_in, s.channels, x_in.dtype());
  a.bias = check_vector("group_norm", "bias", bias, x_in, s.channels, x_in.dtype());
  a.shift = check_vector("group_norm", "shift", shift, x_in, s.batch * s.channels, x_in.dtype());
  LOOM_CHECK(!shift.defined() || shift.shape() == Shape({s.batch, s.channels}), "group_norm: shift ", shift.str(),
             " must be [", s.batch, ", ", s.channels, "]");
  a.batch = s.batch, a.channels = s.channels, a.spatial = s.spatial, a.groups = groups;
  a.eps = eps;
  a.silu = silu;
  if (!statistics_only) a.y = Tensor::empty(x_in.shape(), x_in.dtype(), x_in.device());
  a.mean = Tensor::empty({s.batch, groups}, stat_dtype(x_in.dtype()), x_in.device());
  a.rstd = Tensor::empty({s.batch, groups}, stat_dtype(x_in.dtype()), x_in.device());
  if (s.batch > 0) be.group_norm(a);
  return {a.y, a.mean, a.rstd, Tensor()};
}
}  // namespace

NormForward group_norm(const Tensor& x, int64_t groups, const Tensor& weight, const Tensor& bias, double eps,
                       bool silu, const Tensor& shift) {
  return group_norm_impl(x, groups, weight, bias, eps, silu, shift, false);
}

NormForward group_norm_statistics(const Tensor& x, int64_t groups, double eps, const Tensor& shift) {
  return group_norm_impl(x, groups, Tensor(), Tensor(), eps, false, shift, true);
}

NormGrads group_norm_backward(const Tensor& dy, const Tensor& x, int64_t groups, const Tensor& weight,
                              const Tensor& mean, const Tensor& rstd, NormNeeds needs) {
  check_input("group_norm_backward", x);
  const GroupShape s = group_shape("group_norm_backward", x, groups);
  Backend& be = backend_for("group_norm_backward", OpKind::GroupNorm, x.device(), x.dtype());
  GroupNormGradArgs a;
  a.batch = s.batch, a.channels = s.channels, a.spatial = s.spatial, a.groups = groups;
  a.dy = check_grad("group_norm_backward", dy, x, x.shape());
  a.x = x.contiguous();
  a.weight = check_vector("group_norm_backward", "weight", weight, x, s.channels, x.dtype());
  a.mean = check_vector("group_norm_backward", "mean", mean, x, s.batch * groups, stat_dtype(x.dtype()));
  a.rstd = check_vector("group_norm_backward", "rstd", rstd, x, s.batch * groups, stat_dtype(x.dtype()));
  LOOM_CHECK(a.mean.defined() && a.rstd.defined(), "group_norm_backward: the saved mean and rstd are required");
  a.dx = empty_like_or_none(needs.dx, x);
  a.dweight = empty_vector_or_none(needs.dweight, weight, x, s.channels);
  a.dbias = empty_vector_or_none(needs.dbias, weight, x, s.channels);
  if (s.batch == 0 || s.spatial == 0) {
    if (a.dx.defined()) a.dx.fill_(0.0);
    if (a.dweight.defined()) a.dweight.fill_(0.0);
    if (a.dbias.defined()) a.dbias.fill_(0.0);
  } else if (a.dx.defined() || a.dweight.defined() || a.dbias.defined()) {
    be.group_norm_backward(a);
  }
  return {a.dx, a.dweight, a.dbias};
}

// ---- GEGLU ---------------------------------------------------------------------------------

namespace {
Shape half_last(const char* op, const Tensor& x) {
  LOOM_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, op, ": the last dim of ", x.shape(),
             " must be even (the two halves h and g)");
  Shape s = x.shape();
  s.back() /= 2;
  return s;
}
}  // namespace

Tensor geglu(const Tensor& x_in, bool approximate) {
  check_input("geglu", x_in);
  const Shape out_shape = half_last("geglu", x_in);
  Backend& be = backend_for("geglu", OpKind::Geglu, x_in.device(), x_in.dtype());
  GegluArgs a;
  a.x = x_in.contiguous();
  a.y = Tensor::empty(out_shape, x_in.dtype(), x_in.device());
  a.h = out_shape.back();
  a.rows = a.h == 0 ? 0 : a.y.numel() / a.h;
  a.approximate = approximate;
  if (a.y.numel() > 0) be.geglu(a);
  return a.y;
}

Tensor linear_geglu(const Tensor& x, const Tensor& w, const Tensor& bias) {
  check_input("linear_geglu", x);
  LOOM_CHECK(w.defined() && w.dim() == 2 && w.size(0) % 2 == 0, "linear_geglu: weight ",
             w.defined() ? w.str() : std::string("(undefined)"), " must be [2h, in]");
  LOOM_CHECK(w.device() == x.device() && w.dtype() == x.dtype(), "linear_geglu: weight ", w.str(),
             " is not of the input's dtype and device (", x.str(), ")");
  LOOM_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "linear_geglu: input ", x.shape(), " does not match weight ",
             w.shape(), " (in_features ", w.size(1), ")");
  const Tensor b = check_vector("linear_geglu", "bias", bias, x, w.size(0), x.dtype());
  LinearGegluArgs a;
  a.in = w.size(1), a.h = w.size(0) / 2;
  Shape out_shape = x.shape();
  out_shape.back() = a.h;
  a.rows = a.in == 0 ? 0 : x.numel() / a.in;
  if (a.rows > 0 && a.in > 0 && a.h > 0 && backend_for(x.device()).supports(OpKind::LinearGeglu, x.dtype())) {
    a.x = x.contiguous(), a.w = w.contiguous(), a.bias = b;
    a.y = Tensor::empty(out_shape, x.dtype(), x.device());
    if (backend_for(x.device()).linear_geglu(a)) return a.y;
  }
  return geglu(linear(x, w, bias));
}

Tensor geglu_backward(const Tensor& dy, const Tensor& x, bool approximate) {
  check_input("geglu_backward", x);
  const Shape out_shape = half_last("geglu_backward", x);
  Backend& be = backend_for("geglu_backward", OpKind::Geglu, x.device(), x.dtype());
  GegluGradArgs a;
  a.dy = check_grad("geglu_backward", dy, x, out_shape);
  a.x = x.contiguous();
  a.dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  a.h = out_shape.back();
  a.rows = a.h == 0 ? 0 : a.dy.numel() / a.h;
  a.approximate = approximate;
  if (a.dx.numel() > 0) be.geglu_backward(a);
  return a.dx;
}

// ---- bias + residual ---------------------------------------------------------------------------

Tensor bias_residual(const Tensor& y, const Tensor& bias, const Tensor& residual, int64_t dim) {
  const char* op = "bias_residual";
  check_input(op, y);
  LOOM_CHECK(residual.defined() && residual.shape() == y.shape() && residual.dtype() == y.dtype() &&
                 residual.device() == y.device(),
             op, ": residual ", residual.defined() ? residual.str() : "undefined", " does not match ", y.str());
  LOOM_CHECK(y.dim() >= 1, op, ": 0-d input");
  LOOM_CHECK(dim >= -y.dim() && dim < y.dim(), op, ": dim ", dim, " is out of range for ", y.str());
  const int64_t d = dim < 0 ? dim + y.dim() : dim, n = y.size(d);
  int64_t inner = 1;
  for (int64_t k = d + 1; k < y.dim(); ++k) inner *= y.size(k);
  Backend& be = backend_for(op, OpKind::BiasResidual, y.device(), y.dtype());
  BiasResidualArgs a;
  a.y = y.contiguous();
  a.residual = residual.contiguous();
  a.bias = check_vector(op, "bias", bias, y, n, y.dtype());
  a.n = n;
  a.inner = inner;
  a.rows = n * inner == 0 ? 0 : y.numel() / (n * inner);
  a.out = Tensor::empty(y.shape(), y.dtype(), y.device());
  if (a.out.numel() > 0) be.bias_residual(a);
  return a.out;
}

// ---- GEMM with accumulation into an addend ---------------------------------------------------

namespace {

// The row stride of x read as a row-major [rows, k] matrix (k = x's last dim) with unit column
// stride, or 0 when its layout does not allow that (then it is copied).
int64_t matrix_row_stride(const Tensor& x) {
  const int64_t d = x.dim(), k = x.size(-1);
  if (k != 1 && x.strides()[size_t(d - 1)] != 1) return 0;
  bool found = false;
  int64_t ld = 0, expect = 0;  // ld: the stride of the innermost leading dim of size > 1
  for (int64_t i = d - 2; i >= 0; --i) {
    const int64_t size = x.shape()[size_t(i)], stride = x.strides()[size_t(i)];
    if (size == 1) continue;
    if (!found) found = true, ld = stride;
    else if (stride != expect) return 0;
    expect = stride * size;
  }
  if (!found) return std::max<int64_t>(k, 1);  // a single row
  return ld >= std::max<int64_t>(k, 1) ? ld : 0;
}

// out += alpha·(x·wᵀ) with out contiguous [.., n], checked by the caller.
void accumulate_linear(const char* op, const Tensor& out, const Tensor& x, const Tensor& w, double alpha) {
  Backend& be = backend_for(op, OpKind::Gemm, out.device(), out.dtype());
  const int64_t k = w.size(1), n = w.size(0), m = n == 0 ? 0 : out.numel() / n;
  if (m == 0 || n == 0 || k == 0 || alpha == 0.0) return;
  const int64_t ld = matrix_row_stride(x);
  const Tensor xc = ld > 0 ? x : x.contiguous(), wc = w.contiguous();
  GemmBatch g;
  g.device = out.device(), g.dtype = out.dtype();
  g.m = m, g.n = n, g.k = k, g.batch = 1;
  g.a = xc.raw_data(), g.lda = ld > 0 ? ld : k;        // [m, k]
  g.b = wc.raw_data(), g.ldb = k, g.trans_b = true;    // stored [n, k]
  g.c = out.raw_data(), g.ldc = n;                     // [m, n]
  g.alpha = alpha, g.beta = 1.0;
  be.gemm(g);
}

void check_add_linear(const char* op, const Tensor& y, const Tensor& x, const Tensor& w) {
  LOOM_CHECK(y.defined() && x.defined() && w.defined(), op, ": undefined operand");
  LOOM_CHECK(x.device() == y.device() && w.device() == y.device() && x.dtype() == y.dtype() &&
                 w.dtype() == y.dtype(),
             op, ": operands differ in device or dtype: ", y.str(), ", ", x.str(), ", ", w.str());
  LOOM_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), op, ": input ", x.shape(),
             " does not match weight ", w.shape());
  Shape out_shape = x.shape();
  out_shape.back() = w.size(0);
  LOOM_CHECK(y.shape() == out_shape, op, ": addend ", y.shape(), " does not match x·wᵀ ", out_shape);
  backend_for(op, OpKind::Gemm, y.device(), y.dtype());
}

}  // namespace

Tensor add_linear(const Tensor& y, const Tensor& x, const Tensor& w, double alpha) {
  check_add_linear("add_linear", y, x, w);
  Tensor out = y.clone();  // the GEMM accumulates into it
  accumulate_linear("add_linear", out, x, w, alpha);
  return out;
}

Tensor add_linear_into(const Tensor& y, const Tensor& x, const Tensor& w, double alpha) {
  check_add_linear("add_linear_into", y, x, w);
  LOOM_CHECK(y.is_contiguous(), "add_linear_into: the addend ", y.str(), " must be contiguous");
  accumulate_linear("add_linear_into", y, x, w, alpha);
  return y;
}

// ---- optimizer update ----------------------------------------------------------------------

namespace {

const char* kind_name(OptimizerKind k) {
  switch (k) {
    case OptimizerKind::Sgd: return "sgd";
    case OptimizerKind::Adam: return "adam";
    case OptimizerKind::AdamW: return "adamw";
  }
  return "unknown";
}

void check_entry(const OptimizerUpdateArgs& args, const OptimizerTensor& e, size_t i) {
  const char* op = "optimizer_update";
  LOOM_CHECK(e.param.defined() && e.grad.defined(), op, ": entry ", i, " has an undefined param or grad");
  const Tensor& p = e.param;
  auto same = [&](const Tensor& t, const char* what) {
    LOOM_CHECK(t.defined(), op, " (", kind_name(args.kind), "): entry ", i, " has no ", what);
    LOOM_CHECK(t.shape() == p.shape() && t.dtype() == p.dtype() && t.device() == p.device(), op, ": entry ", i,
               ": ", what, " ", t.str(), " does not match the parameter ", p.str());
    LOOM_CHECK(t.is_contiguous(), op, ": entry ", i, ": ", what, " ", t.str(), " is not contiguous");
  };
  same(p, "param");
  same(e.grad, "grad");
  const bool sgd = args.kind == OptimizerKind::Sgd;
  if (!sgd || args.momentum != 0) same(e.state1, sgd ? "momentum buffer" : "exp_avg");
  if (!sgd) same(e.state2, "exp_avg_sq");
}

}  // namespace

void optimizer_update(const OptimizerUpdateArgs& args) {
  if (args.kind == OptimizerKind::Sgd)
    LOOM_CHECK(!args.nesterov || args.momentum != 0, "optimizer_update: nesterov needs momentum");
  // Entries grouped by (device, dtype), order kept within a group: one backend call per group.
  std::map<std::pair<std::string, int>, OptimizerUpdateArgs> groups;
  for (size_t i = 0; i < args.tensors.size(); ++i) {
    const OptimizerTensor& e = args.tensors[i];
    check_entry(args, e, i);
    if (e.param.numel() == 0) continue;
    auto key = std::make_pair(e.param.device().str(), int(e.param.dtype()));
    auto it = groups.find(key);
    if (it == groups.end()) {
      OptimizerUpdateArgs g = args;
      g.tensors.clear();
      it = groups.emplace(key, std::move(g)).first;
    }
    it->second.tensors.push_back(e);
  }
  for (const auto& kv : groups) {
    const Tensor& p = kv.second.tensors.front().param;
    backend_for("optimizer_update", OpKind::OptimizerUpdate, p.device(), p.dtype()).optimizer_update(kv.second);
  }
}

// ---- loss scaling: unscale + finite check -----------------------------------------------------

void unscale_check_finite(const std::vector<Tensor>& grads, const Tensor& found_inf, double inv_scale) {
  const char* op = "unscale_check_finite";
  LOOM_CHECK(found_inf.defined() && found_inf.dtype() == DType::F32 && found_inf.numel() == 1 &&
                 found_inf.is_contiguous(),
             op, ": found_inf must be one f32 element, got ", found_inf.defined() ? found_inf.str() : "undefined");
  LOOM_CHECK(std::isfinite(inv_scale), op, ": inv_scale must be finite, got ", inv_scale);
  std::map<int, UnscaleArgs> by_dtype;  // order kept within a dtype
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    LOOM_CHECK(g.defined(), op, ": gradient ", i, " is undefined");
    LOOM_CHECK(is_floating(g.dtype()), op, ": gradient ", i, " ", g.str(), " is not floating-point");
    LOOM_CHECK(g.device() == found_inf.device(), op, ": gradient ", i, " ", g.str(), " is not on found_inf's device ",
               found_inf.device());
    LOOM_CHECK(g.is_contiguous(), op, ": gradient ", i, " ", g.str(), " is not contiguous (updated in place)");
    if (g.numel() == 0) continue;
    UnscaleArgs& a = by_dtype[int(g.dtype())];
    a.grads.push_back(g);
  }
  for (auto& kv : by_dtype) {
    UnscaleArgs& a = kv.second;
    a.found_inf = found_inf;
    a.inv_scale = inv_scale;
    backend_for(op, OpKind::UnscaleCheckFinite, found_inf.device(), a.grads.front().dtype()).unscale_check_finite(a);
  }
}

}  // namespace loom::ops
