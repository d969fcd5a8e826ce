// Mixed precision as one policy (SPEC §7), decided here and nowhere else:
//
//   precision  storage of frozen weights  activations  trainable (master) weights + grads + optimizer
//   f32        f32                        f32          f32    GEMMs without TF32 (the reference)
//   tf32       f32                        f32          f32    GEMMs (and f32 attention) on TF32 cores
//   bf16       bf16                       bf16         f32    cast to bf16 for the forward
//   f16        f16                        f16          f32    dynamic loss scaling in training
//
// Everywhere: GEMMs and attention accumulate in f32, norms and softmax statistics are computed in
// f32, the loss and gradient clipping are f32. On the CPU, bf16 / f16 tensors are stored in the
// low precision and computed in f32 by the CPU backend.
#pragma once

#include <string>

#include "tensor/device.h"
#include "tensor/dtype.h"

namespace loom {

enum class Precision { F32, TF32, BF16, F16 };

const char* precision_name(Precision p);
// Parses f32 | tf32 | bf16 | f16 (also fp32, fp16, "no"); throws naming `what` and the value.
Precision parse_precision(const std::string& s, const std::string& what = "--precision");
// The default: bf16 on CUDA, f32 on the CPU.
Precision default_precision(Device device);

// Dtype of frozen weights and activations.
DType storage_dtype(Precision p);
// Dtype of what trains (adapter weights, their gradients, optimizer state): f32 for every
// low-precision storage, else the storage dtype itself (f64 stays f64).
DType master_dtype(DType weight_dtype);

// TF32 tensor-core GEMMs for f32 operands (cuBLAS compute type); off by default.
void set_allow_tf32(bool on);
bool allow_tf32();

// Parses cpu | cuda | cuda:N | auto (auto: cuda:0 when a CUDA device is usable, else cpu) and
// checks that the device exists; throws naming `what` and the device.
Device parse_device(const std::string& s, const std::string& what = "--device");

}  // namespace loom
