// Differentiable ops on Variables. Each op computes its output with
// tensor/ops.h and records its gradient rule right below it (autograd/ops_*.cpp,
// one file per family). autograd/GRADIENTS.md lists every rule, one line per
// input; tests/autograd checks each of them against f64 finite differences.
//
// Binary ops broadcast NumPy-style; the engine sums gradients back down.
#pragma once

#include <utility>
#include <vector>

#include "autograd/ops_conv.h"  // conv2d, interpolate_nearest, silu
#include "autograd/variable.h"

namespace loom {

class Generator;

// ---- elementwise (ops_elementwise.cpp) ------------------------------------------
Variable add(const Variable& a, const Variable& b);
Variable sub(const Variable& a, const Variable& b);
Variable mul(const Variable& a, const Variable& b);
Variable div(const Variable& a, const Variable& b);
Variable neg(const Variable& x);
Variable add_scalar(const Variable& x, double s);  // x + s
Variable mul_scalar(const Variable& x, double s);  // x · s
Variable rsub_scalar(double s, const Variable& x);  // s − x
Variable rdiv_scalar(double s, const Variable& x);  // s / x
Variable exp(const Variable& x);
Variable log(const Variable& x);
Variable sqrt(const Variable& x);
Variable pow(const Variable& x, double p);
Variable tanh(const Variable& x);
Variable sigmoid(const Variable& x);
Variable relu(const Variable& x);
Variable gelu(const Variable& x, bool tanh_approx = false);  // exact erf form by default

inline Variable operator+(const Variable& a, const Variable& b) { return add(a, b); }
inline Variable operator-(const Variable& a, const Variable& b) { return sub(a, b); }
inline Variable operator*(const Variable& a, const Variable& b) { return mul(a, b); }
inline Variable operator/(const Variable& a, const Variable& b) { return div(a, b); }
inline Variable operator-(const Variable& x) { return neg(x); }
inline Variable operator+(const Variable& a, double s) { return add_scalar(a, s); }
inline Variable operator+(double s, const Variable& a) { return add_scalar(a, s); }
inline Variable operator-(const Variable& a, double s) { return add_scalar(a, -s); }
inline Variable operator-(double s, const Variable& a) { return rsub_scalar(s, a); }
inline Variable operator*(const Variable& a, double s) { return mul_scalar(a, s); }
inline Variable operator*(double s, const Variable& a) { return mul_scalar(a, s); }
inline Variable operator/(const Variable& a, double s) { return mul_scalar(a, 1.0 / s); }
inline Variable operator/(double s, const Variable& a) { return rdiv_scalar(s, a); }

// ---- reductions (ops_reduce.cpp) -----------------------------------------------------
// Over the listed dims (negative allowed; empty = all).
Variable sum(const Variable& x, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Variable mean(const Variable& x, const std::vector<int64_t>& dims = {}, bool keepdim = false);
Variable softmax(const Variable& x, int64_t dim);
Variable log_softmax(const Variable& x, int64_t dim);

// ---- matrix products (ops_matmul.cpp) ----------------------------------------------------
// a [..., m, k] · b [..., k, n]; batch dims broadcast; 1-D operands as in NumPy.
Variable matmul(const Variable& a, const Variable& b);
// x [..., in] · wᵀ + bias;  w [out, in], bias [out] or undefined.
Variable linear(const Variable& x, const Variable& w, const Variable& bias = Variable());
// y + alpha·(x·wᵀ) as one GEMM accumulating into y's copy (ops::add_linear): LoRA's
// scaled low-rank term added to the base output; y [..., out], x [..., in], w [out, in].
Variable add_linear(const Variable& y, const Variable& x, const Variable& w, double alpha);
// The same for a y the caller gives up (y is left undefined): when nothing else holds y — its
// Variable and its storage are referenced only here, it is contiguous and not a leaf that
// requires grad — the GEMM accumulates into y's own storage (ops::add_linear_into), without the
// copy: LoRA's up GEMM into the base GEMM's fresh output. Otherwise as above. The gradient rule
// does not read y, so overwriting it is safe for autograd.
Variable add_linear(Variable&& y, const Variable& x, const Variable& w, double alpha);

// ---- shape (ops_shape.cpp) ------------------------------------------------------------
Variable reshape(const Variable& x, const Shape& shape);  // one -1 allowed
Variable permute(const Variable& x, const std::vector<int64_t>& dims);
Variable transpose(const Variable& x, int64_t d0, int64_t d1);
Variable expand(const Variable& x, const Shape& shape);
Variable slice(const Variable& x, int64_t dim, int64_t start, int64_t end, int64_t step = 1);
Variable unsqueeze(const Variable& x, int64_t dim);
Variable squeeze(const Variable& x, int64_t dim);
Variable cat(const std::vector<Variable>& xs, int64_t dim);
// x converted to `dtype` (rounded to nearest); the gradient is converted back to x's dtype. The
// differentiable cast of mixed precision: f32 master weights cast to bf16 for the forward.
Variable to_dtype(const Variable& x, DType dtype);
// `chunks` pieces along dim (the last may be smaller, as in PyTorch).
std::vector<Variable> chunk(const Variable& x, int64_t chunks, int64_t dim);
// Pieces of the given sizes along dim (sizes must add up to x.size(dim)).
std::vector<Variable> split(const Variable& x, const std::vector<int64_t>& sizes, int64_t dim);

// ---- neural-network ops (ops_nn.cpp) ---------------------------------------------------------
// layer_norm, group_norm and geglu run the device's fused kernels (tensor/ops_fused.h)
// with a fused backward; statistics in f32 (f64 for f64), also for bf16/f16 inputs.
// Normalises over the trailing `normalized_shape` dims; weight/bias (that shape) optional.
Variable layer_norm(const Variable& x, const Shape& normalized_shape, const Variable& weight = Variable(),
                    const Variable& bias = Variable(), double eps = 1e-5);
// s = x + residual (one shape) and layer_norm(s, ...), the residual add of a transformer block and
// the norm after it, from one pass (ops::layer_norm with a residual); recorded as an add node and
// a layer_norm node, so gradients are those of the two ops. Returns {s, norm}.
std::pair<Variable, Variable> add_layer_norm(const Variable& x, const Variable& residual, const Shape& normalized_shape,
                                             const Variable& weight = Variable(), const Variable& bias = Variable(),
                                             double eps = 1e-5);
// x [N, C, *]: normalises each of `groups` channel groups over (C/groups, *); weight/bias [C] optional.
Variable group_norm(const Variable& x, int64_t groups, const Variable& weight = Variable(),
                    const Variable& bias = Variable(), double eps = 1e-5);
// silu(group_norm(x + shift, ...)) (ResnetBlock2D's norm and activation; shift [N, C] or undefined,
// broadcast over the spatial dims: a conv's bias plus the time embedding): where no gradient is
// recorded (grad mode off, or no input requires one) one fused pass (ops::group_norm with silu
// and shift, the sum never rounded to x's dtype); else add, group_norm and silu, recorded as such.
Variable group_norm_silu(const Variable& x, int64_t groups, const Variable& weight = Variable(),
                         const Variable& bias = Variable(), double eps = 1e-5, const Variable& shift = Variable());
// x [..., 2h] -> [..., h]: x[..., :h]·gelu(x[..., h:]) (exact erf gelu unless tanh_approx).
Variable geglu(const Variable& x, bool tanh_approx = false);
// geglu(linear(x, w, bias)) (w [2h, in], bias [2h] or undefined): where no gradient is recorded
// one product (ops::linear_geglu: the projection never written nor rounded on devices with the
// kernel); else linear and geglu, recorded as such.
Variable linear_geglu(const Variable& x, const Variable& w, const Variable& bias = Variable());
// (y + bias) + residual in one pass (a projection's or convolution's bias and the residual
// connection); y, residual of one shape, bias [y.size(dim)] (broadcast along the other dims) or
// undefined: dim -1 for a Linear, 1 for a Conv2d's NCHW output.
Variable bias_residual(const Variable& y, const Variable& bias, const Variable& residual, int64_t dim = -1);
// The same three as compositions of primitive ops: the references for the fused ones.
Variable layer_norm_composed(const Variable& x, const Shape& normalized_shape, const Variable& weight = Variable(),
                             const Variable& bias = Variable(), double eps = 1e-5);
Variable group_norm_composed(const Variable& x, int64_t groups, const Variable& weight = Variable(),
                             const Variable& bias = Variable(), double eps = 1e-5);
Variable geglu_composed(const Variable& x, bool tanh_approx = false);
// Zeroes each element with probability p and scales the rest by 1/(1−p); identity when !training or p == 0.
// The mask is drawn on x's device (random_dropout_mask, tensor/random.h) with the seed gen.next_u64():
// one word of `gen` per call, so a seeded generator gives the same masks on every device.
Variable dropout(const Variable& x, double p, bool training, Generator& gen);
// Mean of (pred − target)² over all elements (PyTorch's default reduction).
Variable mse_loss(const Variable& pred, const Variable& target);

}  // namespace loom
