// Internal to tensor/cpu/: the im2col / col2im kernels of the CPU backend
// (contract: Backend::im2col / col2im in tensor/backend.h). f32 and f64 only.
#pragma once

#include "tensor/backend.h"

namespace loom::cpu {

void im2col(const Tensor& cols, const Tensor& image, const Im2ColArgs& args);
void col2im(const Tensor& image, const Tensor& cols, const Im2ColArgs& args);

}  // namespace loom::cpu
