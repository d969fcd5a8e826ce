#pragma once
// Small constant tensors made on the host once and kept for the process (exchange matrices,
// one-hot selection matrices). A step that needs one must not copy it from the host each time:
// the copy costs a synchronous transfer, and inside a CUDA graph capture it is refused outright
// (cudaErrorStreamCaptureImplicit). Entries are never freed (like the cuBLAS handles), so keep
// this for matrices whose size is set by a layer's shape, not by the batch or the sequence.

#include <functional>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace loom {

// The tensor `name` of `shape` in `dtype` on `device`, made from values() (row-major, shape's
// numel of them) at the first call for this (name, shape, dtype, device) and returned from the
// cache afterwards. `name` must say what the values are and hold every parameter they depend on
// beyond the shape (e.g. "nearest_selection"). Thread-safe.
const Tensor& cached_constant(const std::string& name, const Shape& shape, DType dtype, Device device,
                              const std::function<std::vector<double>()>& values);

}  // namespace loom
