// The weight change of LyCORIS modules (LoHa, LoKr) and of DoRA, built densely for the
// adapter choke point (adapters/lora.h) and for fuse(). All matrices are in the (out, K)
// form of the base weight, K = in for a Linear, in·kh·kw for a Conv2d (W (out, in, kh, kw)
// flattened row-major, as LyCORIS and PyTorch flatten it).
//
// LoHa (factors hada_w1_a (out, r1), hada_w1_b (r1, K), hada_w2_a (out, r2), hada_w2_b (r2, K);
// a 4-D (r, in, kh, kw) hada_w*_b is read flattened):
//   ΔW = (w1a·w1b) ∘ (w2a·w2b) · s,      s = alpha / r1 (1 without alpha, or with alpha 0)
// LoKr (lokr_w1 (a1, a2) or lokr_w1_a (a1, r)·lokr_w1_b (r, a2); lokr_w2 (b1, b2[, kh, kw]) or
// lokr_w2_a (b1, r)·lokr_w2_b (r, b2·kh·kw), with a1·b1 = out and a2·b2 = in):
//   ΔW = kron(w1, w2) · s,  kron taken on the (b1, b2·kh·kw) matrix form of w2,
//   s = alpha / r with r the rank of lokr_w1_a (else of lokr_w2_a); s = 1 when both are full.
// LoRA: ΔW = B·A · s.
// DoRA on any of them (magnitude m): with V = W + s·ΔW,
//   W' = m ∘ V / (‖V‖ + eps)   (norm per output row, or per input channel over rows and kernel)
// and the change added to the output is W' − W. The norm is a constant for autograd (detached),
// as PEFT computes it (DoRA paper §4.3): gradients reach m and the factors through m/‖V‖·V only.
// Each adapter's change is computed from the base W, whatever other adapters the module has
// (PEFT's eval forward instead rescales the output accumulated so far: equal when the DoRA
// adapter is the first on its module; docs/io.md).
//
// The Tucker forms (hada_t1 / hada_t2, lokr_t1 / lokr_t2) are not supported: readers refuse
// them by name.
#pragma once

#include <string>

#include "adapters/lora.h"

namespace loom::adapters {

// The LyCORIS factor names of each kind (file key suffixes and parameter names).
const std::vector<std::string>& loha_factor_names();  // hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b
const std::vector<std::string>& lokr_factor_names();  // lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b

// The change the module makes to a weight of shape `weight_shape` ((out, in) or (out, in, kh,
// kw)), as an (out, K) matrix in `dtype`, s included, the adapter weight not: s·ΔW, or W' − W
// with DoRA (`base` (out, K) is then W; it is not read otherwise). Differentiable in the
// module's parameters. Throws naming `path` when the factors do not fit `weight_shape`.
Variable module_delta(const LoraModule& m, const Shape& weight_shape, const Tensor& base, DType dtype,
                      const std::string& path);

// The raw ΔW (no scale, no DoRA) as an (out, K) matrix in `dtype`.
Variable raw_delta(const LoraModule& m, const Shape& weight_shape, DType dtype, const std::string& path);

// Checks the shapes of a LoHa / LoKr module's factors and of a DoRA magnitude against a
// weight of shape `weight_shape`; throws naming the adapter, the module, the key and both
// shapes. Fills m.rank for LoHa / LoKr.
void check_module_shapes(const std::string& adapter, const std::string& path, LoraModule& m,
                         const Shape& weight_shape);

// The rank r of a LoHa / LoKr module as LyCORIS defines it (0 for a LoKr of two full matrices).
int64_t lycoris_rank(const LoraModule& m);

}  // namespace loom::adapters
