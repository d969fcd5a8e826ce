// Internal to tensor/cuda/: parameter structs and launchers of the fused family
// (contracts in tensor/fused_args.h). The flow is the house one: host checks in
// cuda_fused.cu (called by CudaBackend) -> a struct below -> a launcher in cuda_layer_norm.cu /
// cuda_group_norm.cu / cuda_geglu.cu / cuda_optim.cu / cuda_random.cu -> kernels. Launchers run on the
// current device (the caller holds a DeviceGuard), on its compute stream,
// without synchronizing. Storage dtypes f32, f64, bf16, f16; statistics and sums
// in float (double for f64). Pointers address contiguous device memory; an
// optional operand is nullptr when absent.
#pragma once

#include <cstdint>

#include "tensor/backend.h"
#include "tensor/cuda/cuda_common.h"

namespace loom::cuda {

// ---- host entry points (cuda_fused.cu): checks -> params -> launcher ---------------
void fused_layer_norm(const LayerNormArgs& a);
void fused_layer_norm_backward(const LayerNormGradArgs& a);
void fused_group_norm(const GroupNormArgs& a);
void fused_group_norm_backward(const GroupNormGradArgs& a);
void fused_geglu(const GegluArgs& a);
void fused_geglu_backward(const GegluGradArgs& a);
void fused_optimizer_update(const OptimizerUpdateArgs& a);
void fused_bias_residual(const BiasResidualArgs& a);
void fused_random(const RandomArgs& a);
void fused_unscale_check_finite(const UnscaleArgs& a);

// ---- norms (cuda_layer_norm.cu, cuda_group_norm.cu) ---------------------------------------

// x, y [rows, n]; weight, bias [n] or nullptr; mean, rstd [rows] in the stats type.
struct LayerNormParams {
  DType dtype = DType::F32;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* residual = nullptr;  // or null: the norm of x + residual, written to sum
  void* y = nullptr;
  void* mean = nullptr;
  void* rstd = nullptr;
  void* sum = nullptr;
  int64_t rows = 0, n = 0;
  double eps = 1e-5;
};

// dx [rows, n] or nullptr; dweight, dbias [n] or nullptr. `partial` is scratch of
// 2·row_chunks·n stats-type values (needed when dweight or dbias is asked for):
// the column sums of each chunk of rows_per_chunk rows, reduced in a fixed order.
struct LayerNormGradParams {
  DType dtype = DType::F32;
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* mean = nullptr;
  const void* rstd = nullptr;
  void* dx = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
  void* partial = nullptr;
  int64_t rows = 0, n = 0, rows_per_chunk = 1, row_chunks = 1;
};

// x, y [N, C, S]; weight, bias [C] or nullptr; mean, rstd [N, G].
struct GroupNormParams {
  DType dtype = DType::F32;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;  // null: the statistics only
  void* mean = nullptr;
  void* rstd = nullptr;
  int64_t batch = 0, channels = 0, spatial = 0, groups = 1;
  double eps = 1e-5;
  bool silu = false;  // y = silu(x̂·w + b)
  const void* shift = nullptr;  // [batch, channels] or null: the norm of x + shift[n, c]
  void* partial = nullptr;  // scratch: 2·batch·groups·group_norm_chunks(*this) stats-type values
};
// Values per chunk of the group-norm forward's statistics (cuda_group_norm.cu), and the chunks of a group.
constexpr int64_t kGroupNormChunk = 16384;
int64_t group_norm_chunks(const GroupNormParams& p);

// `sums` is scratch of 2·N·C stats-type values: Σ_s dy and Σ_s dy·x̂ per (n, c).
struct GroupNormGradParams {
  DType dtype = DType::F32;
  const void* dy = nullptr;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* mean = nullptr;
  const void* rstd = nullptr;
  void* dx = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
  void* sums = nullptr;
  int64_t batch = 0, channels = 0, spatial = 0, groups = 1;
};

void launch_layer_norm(const LayerNormParams& p);
void launch_layer_norm_backward(const LayerNormGradParams& p);
void launch_group_norm(const GroupNormParams& p);
void launch_group_norm_backward(const GroupNormGradParams& p);

// ---- GEGLU and the bias + residual add (cuda_geglu.cu: the elementwise family) ----------

// Forward: in = x [rows, 2h], out = y [rows, h]. Backward: also dy [rows, h], out = dx.
struct GegluParams {
  DType dtype = DType::F32;
  const void* x = nullptr;
  const void* dy = nullptr;  // backward only
  void* out = nullptr;
  int64_t rows = 0, h = 0;
  bool approximate = false;
};

void launch_geglu(const GegluParams& p);
void launch_geglu_backward(const GegluParams& p);

// out[r, j] = y[r, j] + bias[j] + residual[r, j] over [rows, n]; bias may be nullptr.
struct BiasResidualParams {
  DType dtype = DType::F32;
  const void* y = nullptr;
  const void* bias = nullptr;
  const void* residual = nullptr;
  void* out = nullptr;
  int64_t rows = 0, n = 0, inner = 1;  // [rows, n, inner]; bias [n]
};

void launch_bias_residual(const BiasResidualParams& p);

// ---- optimizer update (cuda_optim.cu) ----------------------------------------------------

// Tensors per launch: the table travels as a kernel parameter (CUDA 12.1+ allows
// 32764 bytes on sm_70 and later), so a step is one launch for up to this many
// tensors and needs no copy of a table to the device.
constexpr int kMaxUpdateTensors = 256;
// Elements per block of the update kernel.
constexpr int64_t kUpdateChunk = 4096;

struct UpdateTensorParams {
  void* param = nullptr;
  const void* grad = nullptr;
  void* state1 = nullptr;  // momentum buffer / exp_avg (nullptr when unused)
  void* state2 = nullptr;  // exp_avg_sq
  int64_t numel = 0;
  int64_t first_block = 0;  // index of this tensor's first chunk in the launch
  double step_size = 0.0, inv_bias2_sqrt = 1.0;
  int first = 0;  // SGD: the momentum buffer starts as d
};

struct OptimizerUpdateParams {
  DType dtype = DType::F32;  // F32 or F64
  OptimizerKind kind = OptimizerKind::Sgd;
  double lr = 0.0, weight_decay = 0.0, momentum = 0.0, dampening = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  int nesterov = 0;
  int count = 0;             // tensors in the table
  int64_t total_blocks = 0;  // Σ ⌈numel / kUpdateChunk⌉
  UpdateTensorParams tensors[kMaxUpdateTensors];
};

void launch_optimizer_update(const OptimizerUpdateParams& p);

// ---- loss scaling: unscale + finite check (cuda_optim.cu) ----------------------------------

// As the optimizer table: up to kMaxUpdateTensors gradients per launch, chunks of
// kUpdateChunk elements. Any non-finite element sets *found_inf = 1 (never cleared).
struct UnscaleTensorParams {
  void* data = nullptr;
  int64_t numel = 0;
  int64_t first_block = 0;
};
struct UnscaleParams {
  DType dtype = DType::F32;
  double inv_scale = 1.0;
  float* found_inf = nullptr;
  int count = 0;
  int64_t total_blocks = 0;
  UnscaleTensorParams tensors[kMaxUpdateTensors];
};

void launch_unscale_check_finite(const UnscaleParams& p);

// ---- counter-based random numbers (cuda_random.cu; transformation in tensor/philox.h) ------

// out [numel] contiguous in `dtype`; element i from the Philox block (seed, offset + i).
struct RandomParams {
  DType dtype = DType::F32;
  RandomKind kind = RandomKind::Uniform;
  void* out = nullptr;
  int64_t numel = 0;
  uint64_t seed = 0, offset = 0;
  double p = 0.0, scale = 1.0;  // DropoutMask: drop probability and 1/(1 − p)
};

void launch_random(const RandomParams& p);

}  // namespace loom::cuda
