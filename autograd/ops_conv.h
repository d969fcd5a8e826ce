// Differentiable image ops for convolutional models (autograd/ops_conv.cpp):
// 2-D convolution, nearest-neighbour resizing, SiLU. Included by autograd/ops.h.
#pragma once

#include "autograd/variable.h"
#include "tensor/conv.h"

namespace loom {

// x [N, C, H, W], w [O, C, kh, kw], bias [O] or undefined -> [N, O, oh, ow]
// (PyTorch's F.conv2d with groups = 1, dilation = 1).
Variable conv2d(const Variable& x, const Variable& w, const Variable& bias = Variable(),
                const ops::Conv2dParams& p = {});
inline Variable conv2d(const Variable& x, const Variable& w, const Variable& bias, int64_t stride,
                       int64_t padding) {
  return conv2d(x, w, bias, ops::Conv2dParams{stride, stride, padding, padding});
}

// conv2d(silu(group_norm(x + shift))) with the norm's parameters in x's dtype (weight, bias [C] or
// undefined; shift [N, C] or undefined): ops::conv2d_normed where no gradient is recorded (the
// norm applied as the convolution's columns are built), else the differentiable composition.
Variable conv2d_after_group_norm_silu(const Variable& x, int64_t groups, const Variable& norm_weight,
                                      const Variable& norm_bias, double eps, const Variable& shift, const Variable& w,
                                      const Variable& bias, const ops::Conv2dParams& p);

// x [N, C, H, W] -> [N, C, out_h, out_w] with PyTorch's F.interpolate(mode="nearest") index rule:
// source row = min(floor(dst · (float)(H / out_h)), H − 1) computed in float, likewise columns.
// An exact 2× resize is a broadcast; other sizes gather rows and columns.
Variable interpolate_nearest(const Variable& x, int64_t out_h, int64_t out_w);
// x · sigmoid(x) (composed).
Variable silu(const Variable& x);

}  // namespace loom
