// Non-differentiable tensor math (namespace loom::ops). Every function checks
// its operands (device, dtype, shape) and throws loom::Error naming the op and
// the offending shapes / dtypes / devices, then dispatches to the operands'
// backend. Autograd rules (autograd/) are written in terms of these.
//
// Binary ops broadcast NumPy-style; operands must share device and dtype.
#pragma once

#include <vector>

#include "tensor/tensor.h"

namespace loom::ops {

// ---- elementwise -------------------------------------------------------
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor maximum(const Tensor& a, const Tensor& b);
Tensor minimum(const Tensor& a, const Tensor& b);

Tensor add_scalar(const Tensor& x, double s);
Tensor mul_scalar(const Tensor& x, double s);
Tensor pow_scalar(const Tensor& x, double p);
Tensor neg(const Tensor& x);
Tensor exp(const Tensor& x);
Tensor log(const Tensor& x);
Tensor sqrt(const Tensor& x);
Tensor rsqrt(const Tensor& x);
Tensor tanh(const Tensor& x);
Tensor sigmoid(const Tensor& x);
Tensor relu(const Tensor& x);
Tensor step(const Tensor& x);  // 1 where x > 0, else 0
Tensor gelu(const Tensor& x, bool tanh_approx = false);
Tensor gelu_grad(const Tensor& x, bool tanh_approx = false);  // d gelu / dx
Tensor silu(const Tensor& x);       // x·σ(x), one pass
Tensor silu_grad(const Tensor& x);  // d silu / dx
Tensor abs(const Tensor& x);
Tensor square(const Tensor& x);
Tensor reciprocal(const Tensor& x);

// ---- reductions ----------------------------------------------------------
// Over the listed dims (negative allowed; empty = all dims).
Tensor sum(const Tensor& x, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor mean(const Tensor& x, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Tensor amax(const Tensor& x, const std::vector<int64_t>& dims = {}, bool keepdim = false);
// The dims a reduction over `dims` of a rank-`rank` tensor covers: sorted,
// unique, non-negative; empty `dims` means every dim. Throws naming `op`.
std::vector<int64_t> reduction_dims(const std::vector<int64_t>& dims, int64_t rank, const char* op);
// Sums a broadcast result back down to `shape` (the un-broadcasting of gradients).
Tensor sum_to(const Tensor& x, const Shape& shape);

// ---- matrix products -------------------------------------------------------
// a [..., m, k] · b [..., k, n] -> [..., m, n]; batch dims broadcast; 1-D operands
// are treated as in NumPy (a vector is promoted and the added dim removed). alpha scales the
// product inside the GEMM (no extra pass).
Tensor matmul(const Tensor& a, const Tensor& b, double alpha = 1.0);
// x [..., in] · wᵀ (w [out, in]) + bias [out] (bias may be undefined) -> [..., out].
Tensor linear(const Tensor& x, const Tensor& w, const Tensor& bias = Tensor());

// ---- softmax family (stable, along `dim`) ------------------------------------
Tensor softmax(const Tensor& x, int64_t dim);
// y = softmax(x) along dim given: dx = y∘(dy − Σ_dim dy∘y) (the device's one-pass kernel along the
// last dim; the composed rule along others).
Tensor softmax_backward(const Tensor& y, const Tensor& dy, int64_t dim);
Tensor log_softmax(const Tensor& x, int64_t dim);
Tensor logsumexp(const Tensor& x, int64_t dim, bool keepdim = false);

// ---- shape -------------------------------------------------------------------
Tensor cat(const std::vector<Tensor>& xs, int64_t dim);

}  // namespace loom::ops
