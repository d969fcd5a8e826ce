#include "tensor/ops.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "tensor/backend.h"

namespace loom::ops {

namespace {

void check_defined(const char* op, const Tensor& x) { LOOM_CHECK(x.defined(), op, ": undefined tensor"); }

void check_same(const char* op, const Tensor& a, const Tensor& b) {
  check_defined(op, a);
  check_defined(op, b);
  LOOM_CHECK(a.device() == b.device(), op, ": tensors on different devices: ", a.str(), " and ", b.str());
  LOOM_CHECK(a.dtype() == b.dtype(), op, ": dtypes differ: ", a.str(), " and ", b.str());
}

Tensor binary(const char* name, BinaryOp op, const Tensor& a, const Tensor& b) {
  check_same(name, a, b);
  const Shape shape = broadcast_shapes(a.shape(), b.shape(), name);
  Backend& be = backend_for(name, OpKind::Binary, a.device(), a.dtype());
  Tensor out = Tensor::empty(shape, a.dtype(), a.device());
  if (out.numel()) be.binary(op, out, a.expand(shape), b.expand(shape));
  return out;
}

Tensor unary(const char* name, UnaryOp op, const Tensor& x, double scalar = 0.0) {
  check_defined(name, x);
  Backend& be = backend_for(name, OpKind::Unary, x.device(), x.dtype());
  const Tensor in = x.contiguous();
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (out.numel()) be.unary(op, out, in, scalar);
  return out;
}

}  // namespace

std::vector<int64_t> reduction_dims(const std::vector<int64_t>& dims, int64_t rank, const char* op) {
  std::vector<int64_t> ds;
  if (dims.empty()) {
    ds.resize(size_t(rank));
    std::iota(ds.begin(), ds.end(), 0);
    return ds;
  }
  for (int64_t d : dims) ds.push_back(wrap_dim(d, rank, op));
  std::sort(ds.begin(), ds.end());
  LOOM_CHECK(std::adjacent_find(ds.begin(), ds.end()) == ds.end(), op, ": repeated dim in ", dims);
  if (rank == 0) ds.clear();
  return ds;
}

namespace {

Tensor reduce(const char* name, ReduceOp op, const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  check_defined(name, x);
  Backend& be = backend_for(name, OpKind::Reduce, x.device(), x.dtype());
  const std::vector<int64_t> ds = reduction_dims(dims, x.dim(), name);
  std::vector<bool> reduced(size_t(x.dim()), false);
  for (int64_t d : ds) reduced[d] = true;

  Shape kept_shape = x.shape();  // keepdim shape
  for (int64_t d : ds) kept_shape[d] = 1;
  int64_t n = 1;
  for (int64_t d : ds) n *= x.shape()[d];
  LOOM_CHECK(op != ReduceOp::Max || n > 0, name, ": cannot take the max over an empty dim of ", x.str());

  Tensor src;
  int64_t outer = 1, inner = 1;
  const bool consecutive = ds.empty() || ds.back() - ds.front() + 1 == int64_t(ds.size());
  if (consecutive) {  // [before, reduced..., after] is already [outer, n, inner]
    src = x.contiguous();
    const int64_t first = ds.empty() ? 0 : ds.front(), last = ds.empty() ? -1 : ds.back();
    for (int64_t d = 0; d < first; ++d) outer *= x.shape()[d];
    for (int64_t d = last + 1; d < x.dim(); ++d) inner *= x.shape()[d];
  } else {  // move the reduced dims last: [kept..., reduced...]
    std::vector<int64_t> perm;
    for (int64_t d = 0; d < x.dim(); ++d)
      if (!reduced[d]) perm.push_back(d), outer *= x.shape()[d];
    for (int64_t d : ds) perm.push_back(d);
    src = x.permute(perm).contiguous();
  }
  Tensor out = Tensor::empty(kept_shape, x.dtype(), x.device());
  if (out.numel()) {
    if (n == 0)
      out.fill_(0.0);
    else
      be.reduce(op, out, src, outer, n, inner);
  }
  if (keepdim) return out;
  Shape squeezed;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (!reduced[d]) squeezed.push_back(x.shape()[d]);
  return out.view(squeezed);
}

// One GEMM operand: a batch of row-major (or, with trans, column-major) matrices
// at a single batch stride.
struct GemmOperand {
  Tensor keep;  // owns the memory the pointer refers to
  const void* ptr = nullptr;
  bool trans = false;
  int64_t ld = 0, batch_stride = 0;
};

// Single stride that walks the batch dims [0, nb) of x in row-major order, or -1.
int64_t collapsed_batch_stride(const Tensor& x, int64_t nb) {
  int64_t stride = -1, expect = -1;
  for (int64_t d = nb - 1; d >= 0; --d) {
    if (x.shape()[d] == 1) continue;
    if (stride < 0) {
      stride = x.strides()[d];
    } else if (x.strides()[d] != expect) {
      return -1;
    }
    expect = x.strides()[d] * x.shape()[d];
    if (stride == 0 && x.strides()[d] != 0) return -1;
  }
  return stride < 0 ? 0 : stride;
}

// x: [batch..., r, c] (batch already expanded). Uses x's memory when its layout allows.
GemmOperand gemm_operand(const Tensor& x) {
  const int64_t nb = x.dim() - 2;
  const int64_t r = x.shape()[nb], c = x.shape()[nb + 1];
  const int64_t rs = x.strides()[nb], cs = x.strides()[nb + 1];
  GemmOperand op;
  const int64_t bstride = collapsed_batch_stride(x, nb);
  if (bstride >= 0 && (cs == 1 || c == 1) && rs >= std::max<int64_t>(c, 1)) {
    op.keep = x, op.trans = false, op.ld = rs;
  } else if (bstride >= 0 && (rs == 1 || r == 1) && cs >= std::max<int64_t>(r, 1)) {
    op.keep = x, op.trans = true, op.ld = cs;
  } else {
    op.keep = x.contiguous(), op.trans = false, op.ld = std::max<int64_t>(c, 1);
  }
  op.batch_stride = collapsed_batch_stride(op.keep, nb);
  op.ptr = op.keep.raw_data();
  return op;
}

}  // namespace

// ---- elementwise -------------------------------------------------------------------

Tensor add(const Tensor& a, const Tensor& b) { return binary("add", BinaryOp::Add, a, b); }
Tensor sub(const Tensor& a, const Tensor& b) { return binary("sub", BinaryOp::Sub, a, b); }
Tensor mul(const Tensor& a, const Tensor& b) { return binary("mul", BinaryOp::Mul, a, b); }
Tensor div(const Tensor& a, const Tensor& b) { return binary("div", BinaryOp::Div, a, b); }
Tensor maximum(const Tensor& a, const Tensor& b) { return binary("maximum", BinaryOp::Max, a, b); }
Tensor minimum(const Tensor& a, const Tensor& b) { return binary("minimum", BinaryOp::Min, a, b); }

Tensor add_scalar(const Tensor& x, double s) { return unary("add_scalar", UnaryOp::AddScalar, x, s); }
Tensor mul_scalar(const Tensor& x, double s) { return unary("mul_scalar", UnaryOp::MulScalar, x, s); }
Tensor pow_scalar(const Tensor& x, double p) { return unary("pow", UnaryOp::PowScalar, x, p); }
Tensor neg(const Tensor& x) { return unary("neg", UnaryOp::Neg, x); }
Tensor exp(const Tensor& x) { return unary("exp", UnaryOp::Exp, x); }
Tensor log(const Tensor& x) { return unary("log", UnaryOp::Log, x); }
Tensor sqrt(const Tensor& x) { return unary("sqrt", UnaryOp::Sqrt, x); }
Tensor rsqrt(const Tensor& x) { return unary("rsqrt", UnaryOp::Rsqrt, x); }
Tensor tanh(const Tensor& x) { return unary("tanh", UnaryOp::Tanh, x); }
Tensor sigmoid(const Tensor& x) { return unary("sigmoid", UnaryOp::Sigmoid, x); }
Tensor relu(const Tensor& x) { return unary("relu", UnaryOp::Relu, x); }
Tensor step(const Tensor& x) { return unary("step", UnaryOp::Step, x); }
Tensor gelu(const Tensor& x, bool tanh_approx) {
  return unary("gelu", tanh_approx ? UnaryOp::GeluTanh : UnaryOp::GeluErf, x);
}
Tensor gelu_grad(const Tensor& x, bool tanh_approx) {
  return unary("gelu_grad", tanh_approx ? UnaryOp::GeluTanhGrad : UnaryOp::GeluErfGrad, x);
}
Tensor silu(const Tensor& x) { return unary("silu", UnaryOp::Silu, x); }
Tensor silu_grad(const Tensor& x) { return unary("silu_grad", UnaryOp::SiluGrad, x); }
Tensor abs(const Tensor& x) { return unary("abs", UnaryOp::Abs, x); }
Tensor square(const Tensor& x) { return unary("square", UnaryOp::Square, x); }
Tensor reciprocal(const Tensor& x) { return unary("reciprocal", UnaryOp::Reciprocal, x); }

// ---- reductions ---------------------------------------------------------------------

Tensor sum(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  return reduce("sum", ReduceOp::Sum, x, dims, keepdim);
}

Tensor amax(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  return reduce("amax", ReduceOp::Max, x, dims, keepdim);
}

Tensor mean(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) {
  check_defined("mean", x);
  backend_for("mean", OpKind::Reduce, x.device(), x.dtype());
  int64_t n = 1;
  for (int64_t d : reduction_dims(dims, x.dim(), "mean")) n *= x.shape()[d];
  LOOM_CHECK(n > 0, "mean: mean over zero elements of ", x.str());
  return mul_scalar(sum(x, dims, keepdim), 1.0 / double(n));
}

Tensor sum_to(const Tensor& x, const Shape& shape) {
  check_defined("sum_to", x);
  if (x.shape() == shape) return x;
  backend_for("sum_to", OpKind::Reduce, x.device(), x.dtype());
  LOOM_CHECK(broadcast_shapes(shape, x.shape(), "sum_to") == x.shape(), "sum_to: ", x.shape(),
             " is not a broadcast of ", shape);
  const int64_t lead = x.dim() - int64_t(shape.size());
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (d < lead || (shape[d - lead] == 1 && x.shape()[d] != 1)) dims.push_back(d);
  if (dims.empty()) return x.reshape(shape);
  return sum(x, dims, true).reshape(shape);
}

// ---- matrix products ----------------------------------------------------------------

namespace {
// matmul, with `bias` (undefined, or [n] in the operands' dtype, contiguous) added to every row in
// the GEMM's epilogue: only where the backend supports(OpKind::GemmBias) (ops::linear checks).
Tensor matmul_with_bias(const Tensor& a_in, const Tensor& b_in, double alpha, const Tensor& bias) {
  LOOM_CHECK(a_in.dim() >= 1 && b_in.dim() >= 1, "matmul: 0-d operand: ", a_in.shape(), " and ", b_in.shape());
  Backend& be = backend_for("matmul", OpKind::Gemm, a_in.device(), a_in.dtype());
  const Tensor a = a_in.dim() == 1 ? a_in.unsqueeze(0) : a_in;   // [..., m, k]
  const Tensor b = b_in.dim() == 1 ? b_in.unsqueeze(-1) : b_in;  // [..., k, n]
  const int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  LOOM_CHECK(b.size(-2) == k, "matmul: inner dims differ: ", a_in.shape(), " vs ", b_in.shape(), " (", k,
             " vs ", b.size(-2), ")");
  const Shape a_batch(a.shape().begin(), a.shape().end() - 2), b_batch(b.shape().begin(), b.shape().end() - 2);
  const Shape batch = broadcast_shapes(a_batch, b_batch, "matmul");
  const int64_t nbatch = shape_numel(batch);

  Shape out_shape = batch;
  out_shape.push_back(m);
  out_shape.push_back(n);
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());

  Shape a_full = batch, b_full = batch;
  a_full.insert(a_full.end(), {m, k});
  b_full.insert(b_full.end(), {k, n});
  GemmOperand A = gemm_operand(a.expand(a_full)), B = gemm_operand(b.expand(b_full));

  GemmBatch g;
  g.device = a.device(), g.dtype = a.dtype();
  g.m = m, g.n = n, g.k = k, g.batch = nbatch;
  // B shared by the whole batch and A's batch rows stacked at ld apart: one GEMM of (batch·m) rows.
  if (nbatch > 1 && B.batch_stride == 0 && !A.trans && A.batch_stride == m * A.ld) {
    g.m = nbatch * m, g.batch = 1;
  }
  g.a = A.ptr, g.trans_a = A.trans, g.lda = A.ld, g.stride_a = A.batch_stride;
  g.b = B.ptr, g.trans_b = B.trans, g.ldb = B.ld, g.stride_b = B.batch_stride;
  g.c = out.raw_data(), g.ldc = std::max<int64_t>(n, 1), g.stride_c = m * n;
  g.alpha = alpha;
  if (bias.defined()) g.bias = bias.raw_data();
  if (out.numel() > 0 && k == 0) out.fill_(0.0);
  if (out.numel() > 0 && k > 0) be.gemm(g);
  if (a_in.dim() == 1) out = out.squeeze(-2);
  if (b_in.dim() == 1) out = out.squeeze(-1);
  return out;
}
}  // namespace

Tensor matmul(const Tensor& a_in, const Tensor& b_in, double alpha) {
  check_same("matmul", a_in, b_in);
  return matmul_with_bias(a_in, b_in, alpha, Tensor());
}

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias) {
  check_same("linear", x, w);
  backend_for("linear", OpKind::Gemm, x.device(), x.dtype());
  LOOM_CHECK(w.dim() == 2, "linear: weight must be 2-D (out, in), got ", w.shape());
  LOOM_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "linear: input ", x.shape(), " does not match weight ",
             w.shape(), " (in_features ", w.size(1), ")");
  if (!bias.defined()) return matmul(x, w.transpose(0, 1));  // [..., in] x [in, out] -> [..., out]
  check_same("linear", x, bias);
  LOOM_CHECK(bias.dim() == 1 && bias.size(0) == w.size(0), "linear: bias ", bias.shape(),
             " does not match weight ", w.shape());
  // The bias in the GEMM's epilogue where the device has one (one rounding, no pass over y);
  // else GEMM, then the broadcast add.
  if (backend_for(x.device()).supports(OpKind::GemmBias, x.dtype()) && x.numel() > 0 && w.size(1) > 0)
    return matmul_with_bias(x, w.transpose(0, 1), 1.0, bias.contiguous());
  return add(matmul(x, w.transpose(0, 1)), bias);
}

// ---- softmax family ---------------------------------------------------------------------

namespace {
Tensor softmax_impl(const char* name, const Tensor& x, int64_t dim, bool log) {
  check_defined(name, x);
  Backend& be = backend_for(name, OpKind::Softmax, x.device(), x.dtype());
  const int64_t d = wrap_dim(dim, x.dim(), name);
  if (x.dim() == 0) return log ? Tensor::zeros({}, x.dtype(), x.device()) : Tensor::ones({}, x.dtype(), x.device());
  const int64_t last = x.dim() - 1;
  const Tensor src = (d == last ? x : x.transpose(d, last)).contiguous();  // softmax dim last
  Tensor out = Tensor::empty(src.shape(), x.dtype(), x.device());
  const int64_t n = src.size(-1);
  if (out.numel()) be.softmax(out, src, out.numel() / n, n, log);
  return d == last ? out : out.transpose(d, last);
}
}  // namespace

Tensor softmax(const Tensor& x, int64_t dim) { return softmax_impl("softmax", x, dim, false); }

Tensor softmax_backward(const Tensor& y, const Tensor& dy, int64_t dim) {
  check_same("softmax_backward", y, dy);
  LOOM_CHECK(y.shape() == dy.shape(), "softmax_backward: y ", y.shape(), " and dy ", dy.shape(), " differ");
  Backend& be = backend_for("softmax_backward", OpKind::Softmax, y.device(), y.dtype());
  if (y.dim() == 0) return Tensor::zeros({}, y.dtype(), y.device());
  const int64_t d = wrap_dim(dim, y.dim(), "softmax_backward"), last = y.dim() - 1;
  if (d != last) return mul(y, sub(dy, sum(mul(dy, y), {d}, true)));  // the composed rule
  const Tensor yc = y.contiguous(), gc = dy.contiguous();
  Tensor dx = Tensor::empty(yc.shape(), y.dtype(), y.device());
  const int64_t n = yc.size(-1);
  if (dx.numel()) be.softmax_backward(dx, yc, gc, dx.numel() / n, n);
  return dx;
}
Tensor log_softmax(const Tensor& x, int64_t dim) { return softmax_impl("log_softmax", x, dim, true); }

Tensor logsumexp(const Tensor& x, int64_t dim, bool keepdim) {
  check_defined("logsumexp", x);
  backend_for("logsumexp", OpKind::Reduce, x.device(), x.dtype());
  if (x.dim() == 0) {
    wrap_dim(dim, 0, "logsumexp");
    return x.clone();  // log(exp(x)) of a single value
  }
  const int64_t d = wrap_dim(dim, x.dim(), "logsumexp");
  // lse = m + log Σ exp(x − m), m = max (0 where the max is infinite, so ±inf rows stay finite-safe)
  Tensor m = amax(x, {d}, true);
  std::vector<double> mv = m.to_vector();
  bool all_finite = true;
  for (double v : mv) all_finite = all_finite && std::isfinite(v);
  if (!all_finite) {
    for (double& v : mv) v = std::isfinite(v) ? v : 0.0;
    m = Tensor::from_values(mv, m.shape(), x.dtype(), x.device());
  }
  Tensor lse = add(log(sum(exp(sub(x, m)), {d}, true)), m);
  return keepdim ? lse : lse.squeeze(d);
}

// ---- shape ------------------------------------------------------------------------------

Tensor cat(const std::vector<Tensor>& xs, int64_t dim) {
  LOOM_CHECK(!xs.empty(), "cat: no tensors given");
  const Tensor& first = xs.front();
  check_defined("cat", first);
  LOOM_CHECK(first.dim() > 0, "cat: 0-d tensors cannot be concatenated (unsqueeze them first)");
  const int64_t d = wrap_dim(dim, first.dim(), "cat");
  Shape shape = first.shape();
  shape[d] = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    check_same("cat", first, xs[i]);
    LOOM_CHECK(xs[i].dim() == first.dim(), "cat: tensor ", i, " has rank ", xs[i].dim(), ", tensor 0 has rank ",
               first.dim());
    for (int64_t j = 0; j < first.dim(); ++j)
      LOOM_CHECK(j == d || xs[i].shape()[j] == first.shape()[j], "cat: tensor ", i, " has shape ", xs[i].shape(),
                 ", incompatible with ", first.shape(), " outside dim ", d);
    shape[d] += xs[i].shape()[d];
  }
  Tensor out = Tensor::empty(shape, first.dtype(), first.device());
  int64_t offset = 0;
  for (const Tensor& x : xs) {
    if (x.shape()[d]) out.narrow(d, offset, x.shape()[d]).copy_(x);
    offset += x.shape()[d];
  }
  return out;
}

}  // namespace loom::ops
