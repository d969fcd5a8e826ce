// The CPU kernel of the Backend's random slot (contract: RandomArgs in tensor/fused_args.h, the
// exact transformation in tensor/philox.h): every element computed from its own Philox block,
// so the result does not depend on the thread count and equals the CUDA kernel's bit for bit
// (this file is compiled with -ffp-contract=off). Called by CpuBackend after tensor/random.cpp's checks.
#pragma once

#include "tensor/fused_args.h"

namespace loom::cpu {

void random(const RandomArgs& a);

}  // namespace loom::cpu
