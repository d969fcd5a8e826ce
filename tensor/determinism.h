// Deterministic algorithms (SPEC §7: runs repeat bit for bit for a seed — on the CPU always, on
// CUDA given `--deterministic`). Off by default: the CUDA backend may then take kernels whose sums
// depend on scheduling or on timing. Set, it takes only kernels whose results depend on their
// inputs alone:
//   flash backward, bf16 / f16   dQ by its query-stationary kernel (no f32 atomics), dK / dV by
//                                one block per key range (query tiles not split over blocks);
//   flash, f32 with TF32 allowed the exact f32 kernels, forward and backward (TF32's backward adds
//                                with atomics);
//   GEMMs with a bias            the heuristic's first algorithm whatever LOOM_GEMM_TUNE says;
//   cuDNN convolutions           deterministic algorithms only.
// Process-wide, like set_allow_tf32 (tensor/precision.h); read by the kernels' callers at every call.
#pragma once

namespace loom {

void set_deterministic_algorithms(bool on);
bool deterministic_algorithms();

}  // namespace loom
