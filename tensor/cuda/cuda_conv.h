// Internal to tensor/cuda/: parameters and launchers of the im2col / col2im
// kernels (cuda_conv.cu). Contract: Backend::im2col / col2im in tensor/backend.h.
#pragma once

#include "tensor/backend.h"

namespace loom::cuda {

// image [N, C, H, W] and cols [N, C·kh·kw, oh·ow], contiguous, one dtype (f32, f64, bf16, f16).
struct Im2ColParams {
  DType dtype = DType::F32;
  void* image = nullptr;  // read by im2col, written by col2im
  void* cols = nullptr;   // written by im2col, read by col2im
  Im2ColArgs geo;
  // im2col only: the image's values group-normed as read (Backend::im2col_normed, Im2ColNorm).
  bool normed = false;
  const void* norm_mean = nullptr;    // [N, groups] f32 (f64 for f64)
  const void* norm_rstd = nullptr;    // [N, groups]
  const void* norm_weight = nullptr;  // [C] or null (1)
  const void* norm_bias = nullptr;    // [C] or null (0)
  const void* norm_shift = nullptr;   // [N, C] or null
  int64_t norm_groups = 1;
  bool norm_silu = false;
};

// Both run on the current device's compute stream and return without synchronizing.
void launch_im2col(const Im2ColParams& p);
// A gather: each image element sums the column entries that read it (in float; double for
// f64), so the result is deterministic and needs no atomics.
void launch_col2im(const Im2ColParams& p);

}  // namespace loom::cuda
