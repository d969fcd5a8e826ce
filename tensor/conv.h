// 2-D convolution on tensors (namespace loom::ops), non-differentiable: the
// forward and the two products its gradient needs. Written as im2col (a Backend
// method, tensor/cpu/cpu_conv.cpp and tensor/cuda/cuda_conv.cu) followed by one
// batched GEMM; a 1×1 convolution with stride 1 and no padding skips im2col. LOOM_CONV (read at
// every call; tensor/conv.cpp) picks another path for CUDA bf16 / f16: `igemm`, the device's
// direct kernel (Backend::conv2d, an implicit GEMM on tensor cores) for the forward and the
// stride-1 input gradient; `cudnn`, the device's convolution library (Backend::library_conv2d*,
// cuDNN) for the forward and both gradients. The default stays im2col + GEMM until the H200
// measures otherwise (docs/gpu-bench.md).
//
//   x [N, C, H, W], w [O, C, kh, kw] (PyTorch's layout), bias [O] (optional)
//   y [N, O, oh, ow],  oh = (H + 2·pad_h − kh) / stride_h + 1 (likewise ow)
//
// groups = 1 and dilation = 1 only. Errors name the op and the shapes.
#pragma once

#include "tensor/backend.h"
#include "tensor/tensor.h"

namespace loom::ops {

struct Conv2dParams {
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
};

// The im2col geometry of x_shape [N, C, H, W] under a kh×kw kernel; checks the sizes.
Im2ColArgs conv2d_geometry(const Shape& x_shape, int64_t kh, int64_t kw, const Conv2dParams& p);
// x [N, C, H, W] -> cols [N, C·kh·kw, oh·ow] (a view of x when the conv is pointwise).
Tensor im2col(const Tensor& x, const Im2ColArgs& g);
// cols [N, C·kh·kw, oh·ow] -> [N, C, H, W]: the adjoint of im2col (overlaps summed).
Tensor col2im(const Tensor& cols, const Im2ColArgs& g);

Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor& bias, const Conv2dParams& p);

// The group norm (+ SiLU) in front of a convolution: conv2d(group_norm(x, groups, weight, bias,
// eps, silu, shift).y, w, conv_bias, p) (tensor/ops_fused.h), not differentiable. Where the
// convolution runs as im2col + GEMM on a device with Backend::im2col_normed (CUDA), the columns
// are built from x and the norm's statistics directly (no normed copy of x is written: one pass
// over the activation fewer); elsewhere, or with LOOM_CONV_NORMED=0 (read at every call), it is
// that composition. Either way the values are the composition's: the norm rounded to x's dtype
// once, then the convolution.
struct GroupNormBeforeConv {
  int64_t groups = 1;
  Tensor weight, bias;  // [C] or undefined
  Tensor shift;         // [N, C] or undefined: the norm of x + shift[n, c]
  double eps = 1e-5;
  bool silu = false;
};
Tensor conv2d_normed(const Tensor& x, const GroupNormBeforeConv& norm, const Tensor& w, const Tensor& bias,
                     const Conv2dParams& p);
// w [O, C, kh, kw] -> [C, O, kh, kw] flipped in space: w'[c, o, i, j] = w[o, c, kh − 1 − i, kw − 1 − j]
// (the weight of the input gradient as a convolution).
Tensor flipped_transposed(const Tensor& w);
// dL/dx for dL/dy = g [N, O, oh, ow], shaped like x_shape: at stride 1 with k > 1 and padding
// ≤ k − 1, conv2d(g, flipped_transposed(w)) at padding k − 1 − p (im2col of g, one GEMM);
// otherwise col2im(Wᵀ·g).
Tensor conv2d_input_grad(const Tensor& g, const Tensor& w, const Shape& x_shape, const Conv2dParams& p);
// dL/dw for dL/dy = g: Σ_n g[n]·cols(x)[n]ᵀ, shaped like w_shape [O, C, kh, kw].
Tensor conv2d_weight_grad(const Tensor& g, const Tensor& x, const Shape& w_shape, const Conv2dParams& p);

}  // namespace loom::ops
