// Internal to tensor/cuda/: the Linear + GEGLU product of Stable Diffusion's feed-forward
// (cuda_gemm_geglu.cu, sm_90a).
#pragma once

#include "tensor/fused_args.h"

namespace loom::cuda {

// Runs a (LinearGegluArgs) on Hopper's tensor cores and returns true; returns false, launching
// nothing, where the kernel does not apply: no sm_90a device or build, a driver without tensor
// maps, a dtype other than bf16 / f16, x or w not 16-byte aligned, `in` or h not a multiple of 8.
// LOOM_LINEAR_GEGLU=0 (read at every call) also returns false: the caller composes linear + geglu.
bool gemm_geglu(const LinearGegluArgs& a);

}  // namespace loom::cuda
