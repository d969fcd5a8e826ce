// Parameter structs of the fused slots of the Backend interface (tensor/backend.h,
// section "fused family"): layer norm, group norm, GEGLU (forward and backward),
// the bias + residual add, the multi-tensor optimizer update, counter-based random
// numbers and the loss-scaling unscale + finite check. Plain data: tensors plus scalars. The checks
// (shapes, dtypes, devices, contiguity) and output allocation happen in
// tensor/ops_fused.cpp before a backend sees a struct.
#pragma once

#include <cstdint>
#include <vector>

#include "tensor/tensor.h"

namespace loom {

// ---- fused ops: parameter structs (callers: tensor/ops_fused.cpp) ---------------------
// Every tensor is on the backend's device and contiguous. "Storage dtype" T is
// f32, f64, bf16 or f16; statistics and accumulation are f32 (f64 when T is f64),
// and the saved statistics `mean` / `rstd` have that accumulation dtype.
// An undefined output tensor means "not needed": the backend skips it.

// Layer norm over the last dim of x [rows, n]:
//   mean[r] = Σ_j x[r,j]/n,  rstd[r] = 1/√(Σ_j (x[r,j] − mean[r])²/n + eps)
//   y[r,j] = (x[r,j] − mean[r])·rstd[r]·weight[j] + bias[j]
// weight, bias: [n] of dtype T, or undefined (1 and 0). y: [rows, n] T. mean, rstd: [rows].
// residual [rows, n] T (or undefined): the norm is of s = x + residual, rounded to T and written to
// sum [rows, n] — the add and the norm of a transformer block's residual stream in one pass, with
// the values of the two ops apart.
struct LayerNormArgs {
  Tensor x, weight, bias, residual;
  Tensor y, mean, rstd, sum;  // outputs (sum only with a residual)
  int64_t rows = 0, n = 0;
  double eps = 1e-5;
};

// Backward of LayerNormArgs with x̂ = (x − mean)·rstd, ĝ = dy·weight:
//   dx = rstd·(ĝ − mean_j(ĝ) − x̂·mean_j(ĝ·x̂)),  dweight = Σ_r dy·x̂,  dbias = Σ_r dy.
// dx [rows, n] T; dweight, dbias [n] T; any of the three may be undefined.
struct LayerNormGradArgs {
  Tensor dy, x, weight, mean, rstd;  // weight may be undefined
  Tensor dx, dweight, dbias;         // outputs
  int64_t rows = 0, n = 0;
};

// Group norm of x [N, C, S] (S = product of the spatial dims) in G groups of C/G
// channels: statistics per (sample, group) over C/G·S values, as LayerNormArgs;
// y[n,c,s] = x̂·weight[c] + bias[c]. weight, bias: [C] T or undefined. mean, rstd: [N, G].
// shift [N, C] T or undefined: the group norm of u = x + shift[n, c] (broadcast over S), with u
// formed in the compute type and never stored (a ResnetBlock2D's conv bias and time embedding
// added inside norm2's pass; inference only: no backward takes a shift).
struct GroupNormArgs {
  Tensor x, weight, bias, shift;
  Tensor y, mean, rstd;  // outputs; y undefined: the statistics only
  int64_t batch = 0, channels = 0, spatial = 0, groups = 1;
  double eps = 1e-5;
  bool silu = false;  // y = silu(x̂·w + b), one rounding (inference only: no backward takes this y)
};

// Backward of GroupNormArgs (the rule of LayerNormGradArgs per (sample, group));
// dweight[c] = Σ_{n,s} dy·x̂, dbias[c] = Σ_{n,s} dy. Outputs may be undefined.
struct GroupNormGradArgs {
  Tensor dy, x, weight, mean, rstd;
  Tensor dx, dweight, dbias;  // outputs
  int64_t batch = 0, channels = 0, spatial = 0, groups = 1;
};

// GEGLU: x [rows, 2h] -> y [rows, h],  y[r,j] = x[r,j]·gelu(x[r,h+j]) (exact erf
// gelu; the tanh form with `approximate`). Backward (dy given):
//   dx[r,j] = dy·gelu(x[r,h+j]),  dx[r,h+j] = dy·x[r,j]·gelu'(x[r,h+j]).
struct GegluArgs {
  Tensor x, y;  // y: output
  int64_t rows = 0, h = 0;
  bool approximate = false;
};
struct GegluGradArgs {
  Tensor dy, x, dx;  // dx: output [rows, 2h]
  int64_t rows = 0, h = 0;
  bool approximate = false;
};

// A Linear followed by GEGLU in one product (inference: no backward): y [rows, h] =
// (x·W[:h]ᵀ + b[:h]) · gelu(x·W[h:]ᵀ + b[h:]), the sums kept in f32 until the one rounding of y.
// x [rows, in], w [2h, in], y [rows, h] contiguous, of one dtype; bias [2h] or undefined.
struct LinearGegluArgs {
  Tensor x, w, bias, y;  // y: output
  int64_t rows = 0, in = 0, h = 0;
};

// Bias + residual add after a projection or a convolution, one pass instead of two, all of
// dtype T: over [rows, n, inner] (contiguous), out[r,j,i] = (y[r,j,i] + bias[j]) + residual[r,j,i]
// with bias [n] or undefined. inner = 1: a Linear's bias along the last dim; inner = H·W: a
// convolution's per-channel bias over NCHW.
struct BiasResidualArgs {
  Tensor y, bias, residual;
  Tensor out;  // output
  int64_t rows = 0, n = 0, inner = 1;
};

// One optimizer step over many tensors at once (PyTorch's SGD / Adam / AdamW, as
// optim/ documents them), in place. Every entry: param, grad and the state tensors
// have one shape and the param's dtype (f32 master weights; f64 for checks).
// The arithmetic is the composed update's, operation for operation, in T (scalars
// rounded to T first), so results equal optim/'s former per-tensor op chains:
//   SGD:   d = g + p·wd;  momentum: buf = first ? d : buf·μ + d·(1 − dampening),
//          d = nesterov ? d + buf·μ : buf;   p = p − d·lr
//   Adam:  g = g + p·wd  (AdamW instead: p = p·(1 − lr·wd));
//          m = m·β1 + g·(1 − β1);  v = v·β2 + (g·g)·(1 − β2);
//          p = p − (m / (√v·(1/√(1 − β2ᵗ)) + eps))·(lr/(1 − β1ᵗ))
// The per-entry step corrections come from the host (each tensor counts its own t).
enum class OptimizerKind { Sgd, Adam, AdamW };
struct OptimizerTensor {
  Tensor param, grad;
  Tensor state1;  // SGD: momentum buffer (undefined without momentum); Adam: exp_avg
  Tensor state2;  // Adam: exp_avg_sq
  bool first = false;           // SGD: the buffer starts as d (its first update)
  double step_size = 0.0;       // Adam: lr / (1 − β1ᵗ)
  double inv_bias2_sqrt = 1.0;  // Adam: 1 / √(1 − β2ᵗ)
};
struct OptimizerUpdateArgs {
  OptimizerKind kind = OptimizerKind::Sgd;
  double lr = 0.0, weight_decay = 0.0;
  double momentum = 0.0, dampening = 0.0;
  bool nesterov = false;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::vector<OptimizerTensor> tensors;  // one device, one dtype
};

// Counter-based random numbers (tensor/philox.h states the exact transformation; host side
// in tensor/random.cpp): out[i] is a function of the Philox4x32-10 block (key = seed,
// counter = offset + i) alone, bit-identical on every device. out: contiguous, f32, f64,
// bf16 or f16 (the storage dtype; the value is computed in double and rounded once, half
// types through float).
//   Uniform:     [0, 1) on the dtype's significand grid
//   Normal:      standard normal (Box–Muller)
//   DropoutMask: 1/(1 − p) where the element is kept (probability 1 − p), else 0
enum class RandomKind { Uniform, Normal, DropoutMask };
struct RandomArgs {
  Tensor out;  // output
  RandomKind kind = RandomKind::Uniform;
  uint64_t seed = 0, offset = 0;
  double p = 0.0;  // DropoutMask: the drop probability, 0 ≤ p < 1
};

// Dynamic loss scaling's unscale step over many gradients at once (PyTorch's
// _amp_foreach_non_finite_check_and_unscale_): every element g of every tensor is
// checked first, found_inf[0] = 1 when any is inf or nan (never cleared here: the caller
// zeroes it), then replaced by g·inv_scale (inv_scale rounded to the grads' dtype, or
// to float for bf16/f16, computed as in that type) in place.
// grads: contiguous, one device and one floating dtype; found_inf: one f32 element on
// that device.
struct UnscaleArgs {
  std::vector<Tensor> grads;  // updated in place
  Tensor found_inf;           // output flag
  double inv_scale = 1.0;
};

}  // namespace loom
