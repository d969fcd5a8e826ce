// The CPU kernels of the Backend's fused slots (contracts in tensor/fused_args.h):
// layer norm, group norm, GEGLU (forward and backward), the multi-tensor
// optimizer update, the bias + residual add and loss scaling's unscale + finite
// check. Storage dtypes f32, f64, bf16, f16 (the optimizer update: f32 and f64);
// bf16/f16 are computed in f32. The
// forward statistics are summed in the compute type (f32, or f64 for f64) in
// blocks, as on CUDA; the backward's sums in double. The optimizer update runs
// the composed update's operations one by one in the parameter's dtype (this file
// is compiled with -ffp-contract=off), so it equals optim/'s former op chains bit
// for bit. Called by CpuBackend (cpu_backend.cpp) after tensor/ops_fused.cpp's checks.
#pragma once

#include "tensor/fused_args.h"

namespace loom::cpu {

void layer_norm(const LayerNormArgs& a);
void layer_norm_backward(const LayerNormGradArgs& a);
void group_norm(const GroupNormArgs& a);
void group_norm_backward(const GroupNormGradArgs& a);
void geglu(const GegluArgs& a);
void geglu_backward(const GegluGradArgs& a);
void optimizer_update(const OptimizerUpdateArgs& a);
void bias_residual(const BiasResidualArgs& a);
void unscale_check_finite(const UnscaleArgs& a);

}  // namespace loom::cpu
