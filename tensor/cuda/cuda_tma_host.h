// Internal to tensor/cuda/ (host side): Hopper tensor maps (CUtensorMap, the descriptor a TMA copy
// reads, cuda_tma.cuh) made by the driver's cuTensorMapEncodeTiled, which is found through the
// runtime (cudaGetDriverEntryPointByVersion): loom does not link against libcuda, which machines
// without a GPU lack.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <string>

#include "tensor/dtype.h"

namespace loom::cuda {

// Whether the driver offers cuTensorMapEncodeTiled (callers fall back to kernels without TMA).
bool tensor_maps_available();

// The tiled map of a `rank`-dimensional tensor of bf16 / f16 at `base` (16-byte aligned): dims
// innermost first, strides in bytes of dims 1 … rank − 1 (multiples of 16), the box copied per TMA
// instruction (its innermost extent × 2 bytes = 128 for the 128-byte swizzle), elements of a box
// outside the tensor arriving as zeros. Throws naming `what` (and the sizes) when the driver refuses.
CUtensorMap tensor_map_sw128(DType dtype, int rank, const void* base, const cuuint64_t* dims,
                             const cuuint64_t* strides, const cuuint32_t* box, const std::string& what);

}  // namespace loom::cuda
