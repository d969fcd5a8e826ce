// The host backend: kernels written with Eigen 3 (GEMM) and OpenMP loops.
//
//   supports(): Copy and Fill for f32, f64, bf16, f16, i64;
//               Unary, Binary, Reduce, Softmax, Gemm for f32 and f64 only;
//               LayerNorm, GroupNorm, Geglu for f32, f64, bf16, f16 and
//               OptimizerUpdate for f32, f64 (the fused slots, cpu_fused.h).
//
// Memory is 64-byte aligned host memory; device_index is ignored. Kernels
// parallelise with OpenMP above a size threshold, so small ops stay on the
// calling thread. Batched GEMM runs the batch in parallel when it has at least
// as many entries as there are OpenMP threads, and otherwise lets Eigen thread
// each product.
#pragma once

#include "tensor/backend.h"

namespace loom {

// The process-wide CPU backend (created on first use, never destroyed early).
Backend* cpu_backend();

}  // namespace loom
