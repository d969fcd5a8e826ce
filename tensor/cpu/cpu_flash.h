// Internal to tensor/cpu/: the CPU kernels behind Backend::flash_attention_* (tensor/backend.h),
// f32 and f64. Contracts as in FlashAttentionArgs; cpu_flash.cpp explains the tiling.
#pragma once

#include "tensor/backend.h"

namespace loom::cpu {

// Throws naming the backend and the feature when the CPU kernel cannot run `a`.
void flash_check(const FlashAttentionArgs& a);
void flash_forward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse);
void flash_backward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                    const Tensor& dq, const Tensor& dk, const Tensor& dv);

}  // namespace loom::cpu
