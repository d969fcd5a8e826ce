// The CPU backend's reduction, softmax and GEMM kernels (tensor/cpu/cpu_reduce.cpp,
// tensor/cpu/cpu_gemm.cpp), called by CpuBackend (cpu_backend.cpp) with the Backend contract of
// tensor/backend.h: bf16 / f16 computed in f32; f32 / f64 directly.
#pragma once

#include "tensor/backend.h"

namespace loom::cpu {

void reduce(ReduceOp op, const Tensor& out, const Tensor& in, int64_t outer, int64_t n, int64_t inner);
void softmax(const Tensor& out, const Tensor& in, int64_t rows, int64_t n, bool log);
void softmax_backward(const Tensor& dx, const Tensor& y, const Tensor& dy, int64_t rows, int64_t n);
void gemm(const GemmBatch& g);

}  // namespace loom::cpu
