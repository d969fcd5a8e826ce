// Internal to tensor/cuda/: the implicit-GEMM convolution (cuda_conv_igemm.cu), bf16 / f16 on
// tensor cores with f32 accumulation. Contracts: Conv2dArgs / Conv2dInputGradArgs in
// tensor/backend.h; CudaBackend::conv2d / conv2d_input_grad forward to the two entry points.
#pragma once

#include "tensor/backend.h"

namespace loom::cuda {

// ---- host entry points: checks (CUDA device, dtype, contiguity, shapes, 32-bit sizes) -> launch ----
// y = conv(x, w) + bias, any kernel size up to kConv2dMaxKernel (32: its per-pixel tap masks have 32 bits), stride and padding, dilation 1.
void conv2d_implicit_gemm(const Conv2dArgs& a);
// dx for stride 1 and pad ≤ kernel − 1: builds w' [C, O, kh, kw] (flipped, transposed) and runs the
// forward kernel on dy with padding (kh − 1 − pad_h, kw − 1 − pad_w).
void conv2d_input_grad_implicit_gemm(const Conv2dInputGradArgs& a);

// ---- launcher parameters ----------------------------------------------------------------
// x [batch, channels, height, width], w [out_channels, channels·kernel_h·kernel_w] (row-major,
// k = (c·kernel_h + i)·kernel_w + j), bias [out_channels] or nullptr, y [batch, out_channels,
// out_h, out_w]; contiguous device memory of one dtype (bf16 or f16). The launcher's callers
// guarantee that batch·out_h·out_w, channels·height·width, out_channels·out_h·out_w and
// out_channels·channels·kernel_h·kernel_w are below 2^31 (32-bit index math within those ranges).
struct ConvGemmParams {
  DType dtype = DType::BF16;
  const void* x = nullptr;
  const void* w = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;
  int batch = 0, channels = 0, height = 0, width = 0;
  int out_channels = 0, kernel_h = 1, kernel_w = 1;
  int stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  int out_h = 0, out_w = 0;
};
// On the current device's compute stream, without synchronizing.
void launch_conv_igemm(const ConvGemmParams& p);
// wt[c, o, i, j] = w[o, c, kh − 1 − i, kw − 1 − j]: w [O, C, kh, kw] -> wt [C, O, kh, kw], 16-bit
// elements (bf16 / f16), contiguous; O·C·kh·kw < 2^31.
void launch_conv_flip_weight(void* wt, const void* w, int out_channels, int channels, int kh, int kw);

}  // namespace loom::cuda
