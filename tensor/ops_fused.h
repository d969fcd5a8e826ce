// Fused tensor ops (namespace loom::ops): the host side of the Backend's fused
// slots (tensor/backend.h, structs in tensor/fused_args.h). Each function checks
// its operands (defined, one device, one dtype, shapes), makes them contiguous,
// allocates the outputs and calls one backend method; errors name the op and the
// offending shapes / dtypes / devices. Statistics come back in f32 (f64 for f64
// inputs). Autograd rules (autograd/ops_nn.cpp) and optim/ call these.
#pragma once

#include "tensor/backend.h"
#include "tensor/tensor.h"

namespace loom::ops {

// Output of a norm's forward: y (x's shape and dtype) and the saved statistics.
struct NormForward {
  Tensor y, mean, rstd;
  Tensor sum;  // layer_norm with a residual: x + residual, the tensor normalised
};
// Gradients of a norm; each is undefined where it was not asked for.
struct NormGrads {
  Tensor dx, dweight, dbias;
};
// Which gradients a backward computes.
struct NormNeeds {
  bool dx = true, dweight = true, dbias = true;
};

// Layer norm over the trailing `n` elements of x (x.numel() divisible by n):
// rows = numel/n; weight, bias have n elements (any shape, e.g. normalized_shape)
// or are undefined. mean/rstd: [rows]. dweight/dbias come back in weight's shape.
// residual (x's shape, or undefined): the norm of x + residual, whose sum (rounded to x's dtype, as
// ops::add's) comes back in .sum — one pass where the device has one (CUDA's row-in-registers
// kernel), else the add and then the norm.
NormForward layer_norm(const Tensor& x, int64_t n, const Tensor& weight, const Tensor& bias, double eps,
                       const Tensor& residual = Tensor());
NormGrads layer_norm_backward(const Tensor& dy, const Tensor& x, int64_t n, const Tensor& weight,
                              const Tensor& mean, const Tensor& rstd, NormNeeds needs = {});

// Group norm of x [N, C, *] in `groups` groups; weight, bias [C] or undefined.
// mean/rstd: [N, groups]. silu: y = silu(x̂·w + b) in one pass and one rounding (inference: the
// backward takes the plain y's statistics, not this y). shift [N, C] (or undefined): the norm of
// x + shift[n, c], the sum formed inside the pass and never rounded to x's dtype (inference: no
// backward takes it; the statistics returned are those of the shifted values).
NormForward group_norm(const Tensor& x, int64_t groups, const Tensor& weight, const Tensor& bias, double eps,
                       bool silu = false, const Tensor& shift = Tensor());
NormGrads group_norm_backward(const Tensor& dy, const Tensor& x, int64_t groups, const Tensor& weight,
                              const Tensor& mean, const Tensor& rstd, NormNeeds needs = {});
// group_norm's mean and rstd alone (y undefined): the statistics that Backend::im2col_normed reads.
NormForward group_norm_statistics(const Tensor& x, int64_t groups, double eps, const Tensor& shift = Tensor());

// GEGLU: x [..., 2h] -> [..., h] = x[..., :h]·gelu(x[..., h:]); backward gives dx [..., 2h].
Tensor geglu(const Tensor& x, bool approximate = false);
Tensor geglu_backward(const Tensor& dy, const Tensor& x, bool approximate = false);
// geglu(linear(x, w, bias)) (x [..., in], w [2h, in], bias [2h] or undefined -> [..., h]) as one
// product where the device has one (Backend::linear_geglu; CUDA on Hopper, bf16 / f16): the
// [..., 2h] projection is never written, and is not rounded to x's dtype before the gelu and the
// product. Elsewhere linear, then geglu. No backward: for inference (nn::GEGLU without gradients).
Tensor linear_geglu(const Tensor& x, const Tensor& w, const Tensor& bias);

// (y + bias) + residual in one pass: y, residual of one shape, bias [y.size(dim)] (broadcast along
// every other dim) or undefined. dim -1: a Linear's bias; dim 1 of NCHW: a convolution's.
Tensor bias_residual(const Tensor& y, const Tensor& bias, const Tensor& residual, int64_t dim = -1);

// y + alpha·(x·wᵀ) with x [..., in], w [out, in], y [..., out]: one GEMM whose
// epilogue accumulates into (a copy of) y (beta = 1), so the product is never
// materialised on its own: LoRA's scaled up-projection added to the base output.
// x may be a view whose leading dims collapse to rows at a fixed stride with unit column stride
// (a [.., r] column slice of a wider tensor): the GEMM reads it in place.
Tensor add_linear(const Tensor& y, const Tensor& x, const Tensor& w, double alpha);
// The same accumulating into y itself (y contiguous, overwritten with y + alpha·(x·wᵀ)), for a y
// that nothing else reads: no copy of y. Returns y.
Tensor add_linear_into(const Tensor& y, const Tensor& x, const Tensor& w, double alpha);

// One fused optimizer step over args.tensors (contract in tensor/fused_args.h).
// Checks every entry (defined, contiguous, one device and dtype, matching
// shapes, the state the kind needs) and calls the backend once per device.
void optimizer_update(const OptimizerUpdateArgs& args);

// Loss scaling's unscale step over many gradients (contract: UnscaleArgs in
// tensor/fused_args.h; PyTorch's _amp_foreach_non_finite_check_and_unscale_): each
// gradient is multiplied by inv_scale in place, and found_inf (one f32 element) is set
// to 1 when any gradient held an inf or nan; it is not cleared first. Every gradient is
// contiguous and floating, on found_inf's device; one backend call per dtype.
void unscale_check_finite(const std::vector<Tensor>& grads, const Tensor& found_inf, double inv_scale);

}  // namespace loom::ops
