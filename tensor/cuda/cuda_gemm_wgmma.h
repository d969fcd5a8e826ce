// Internal to tensor/cuda/: loom's own GEMMs on Hopper's tensor cores (cuda_gemm_wgmma.cu, sm_90a):
// the Linear + GEGLU product of Stable Diffusion's feed-forward, and a Linear with or without its bias.
#pragma once

#include "tensor/backend.h"
#include "tensor/fused_args.h"

namespace loom::cuda {

// Runs a (LinearGegluArgs) on Hopper's tensor cores and returns true; returns false, launching
// nothing, where the kernel does not apply: no sm_90a device or build, a driver without tensor
// maps, a dtype other than bf16 / f16, x or w not 16-byte aligned, `in` or h not a multiple of 8.
// LOOM_LINEAR_GEGLU=0 (read at every call) also returns false: the caller composes linear + geglu.
bool gemm_geglu(const LinearGegluArgs& a);

// Runs g (C = A·Bᵀ (+ bias), A [m, k] row-major, B stored [n, k] row-major, i.e. trans_b — a
// Linear's x·Wᵀ + b) with the same kernel's main loop and returns true; returns false, launching
// nothing, unless LOOM_GEMM_WGMMA (read at every call) asks for it — `bias`: GEMMs with a bias,
// `all`: also those without (then n ≥ 128 and k ≥ 64); unset or 0: none, the caller's cuBLAS /
// cuBLASLt path — and g fits: batch 1, alpha 1, beta 0, bf16 / f16, m ≥ 128, k, n, lda, ldb
// multiples of 8, A and B 16-byte aligned, C and the bias 4-byte aligned, ldc even.
bool gemm_wgmma(const GemmBatch& g);

}  // namespace loom::cuda
