// Internal to tensor/cuda/: convolution through cuDNN (cuda_conv_cudnn.cu), bf16 / f16 with f32
// accumulation on tensor cores, NCHW as loom stores it. Contracts: Conv2dArgs, Conv2dInputGradArgs
// (any stride and padding here), Conv2dWeightGradArgs in tensor/backend.h; CudaBackend's
// library_conv2d* slots forward to these. Built with cuDNN where CMake finds it (the CUDA
// toolkit's, or CUDNN_ROOT: e.g. the nvidia-cudnn wheel of a PyTorch install); without it
// cudnn_conv_available() is false and the entry points throw saying so.
//
// Algorithms: cuDNN's heuristics (the _v7 queries: no benchmarking, so a CUDA graph can capture
// every call), the first that runs with at most 1 GiB of workspace, preferring deterministic ones
// for both gradients, run with the math type cuDNN reported for it; cached per shape. The
// workspace comes from loom's caching allocator.
#pragma once

#include <string>

#include "tensor/backend.h"

namespace loom::cuda {

// Whether this build has cuDNN and a cuDNN handle could be made on the current device (tried
// once per device). cudnn_unavailable_reason() says why not.
bool cudnn_conv_available();
std::string cudnn_unavailable_reason();

// y = conv(x, w) (+ bias, added after the convolution's rounding to y's dtype).
void cudnn_conv2d(const Conv2dArgs& a);
// dx = the gradient of the convolution in x, any stride and padding (overwrites dx).
void cudnn_conv2d_input_grad(const Conv2dInputGradArgs& a);
// dw = the gradient of the convolution in w (overwrites dw).
void cudnn_conv2d_weight_grad(const Conv2dWeightGradArgs& a);

}  // namespace loom::cuda
