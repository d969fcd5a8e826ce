// Host side of the CUDA fused family: CudaBackend's fused slots forward here.
// Each entry checks its operands (CUDA device, dtype, contiguity: tensor/ops_fused.cpp
// has already checked shapes), allocates scratch, fills a parameter struct
// (cuda_fused.h) and calls one launcher with the operands' device current.
#include <algorithm>
#include <initializer_list>

#include "tensor/cuda/cuda_fused.h"

namespace loom::cuda {

namespace {

DType stat_dtype(DType t) { return t == DType::F64 ? DType::F64 : DType::F32; }

// The CUDA device index of `x`; every other defined tensor must be contiguous on it.
int fused_device(const char* op, const Tensor& x, std::initializer_list<const Tensor*> others) {
  LOOM_CHECK(x.defined() && x.device().is_cuda(), "cuda ", op, ": input is not a CUDA tensor");
  LOOM_CHECK(x.dtype() != DType::I64, "cuda ", op, ": not supported for dtype ", x.dtype());
  LOOM_CHECK(x.is_contiguous(), "cuda ", op, ": input ", x.str(), " is not contiguous");
  for (const Tensor* t : others) {
    if (!t->defined()) continue;
    LOOM_CHECK(t->device() == x.device(), "cuda ", op, ": tensor ", t->str(), " is not on ", x.device());
    LOOM_CHECK(t->is_contiguous(), "cuda ", op, ": tensor ", t->str(), " is not contiguous");
  }
  return x.device().index;
}

const void* cptr(const Tensor& t) { return t.defined() ? t.raw_data() : nullptr; }
void* mptr(const Tensor& t) { return t.defined() ? t.raw_data() : nullptr; }

}  // namespace

void fused_layer_norm(const LayerNormArgs& a) {
  const int device =
      fused_device("layer_norm", a.x, {&a.weight, &a.bias, &a.residual, &a.y, &a.mean, &a.rstd, &a.sum});
  LayerNormParams p;
  p.dtype = a.x.dtype();
  p.x = cptr(a.x), p.weight = cptr(a.weight), p.bias = cptr(a.bias), p.residual = cptr(a.residual);
  p.y = mptr(a.y), p.mean = mptr(a.mean), p.rstd = mptr(a.rstd), p.sum = mptr(a.sum);
  p.rows = a.rows, p.n = a.n, p.eps = a.eps;
  DeviceGuard guard(device);
  launch_layer_norm(p);
}

void fused_layer_norm_backward(const LayerNormGradArgs& a) {
  const int device =
      fused_device("layer_norm_backward", a.x, {&a.dy, &a.weight, &a.mean, &a.rstd, &a.dx, &a.dweight, &a.dbias});
  LayerNormGradParams p;
  p.dtype = a.x.dtype();
  p.dy = cptr(a.dy), p.x = cptr(a.x), p.weight = cptr(a.weight), p.mean = cptr(a.mean), p.rstd = cptr(a.rstd);
  p.dx = mptr(a.dx), p.dweight = mptr(a.dweight), p.dbias = mptr(a.dbias);
  p.rows = a.rows, p.n = a.n;
  // Column sums in chunks of at least 32 rows, at most 256 chunks.
  p.rows_per_chunk = std::max<int64_t>(32, (a.rows + 255) / 256);
  p.row_chunks = (a.rows + p.rows_per_chunk - 1) / p.rows_per_chunk;
  Tensor partial;  // freed after the launch: the caching allocator orders reuse on the stream
  if (a.dweight.defined() || a.dbias.defined()) {
    partial = Tensor::empty({2, p.row_chunks, a.n}, stat_dtype(p.dtype), a.x.device());
    p.partial = partial.raw_data();
  }
  DeviceGuard guard(device);
  launch_layer_norm_backward(p);
}

void fused_group_norm(const GroupNormArgs& a) {
  const int device = fused_device("group_norm", a.x, {&a.weight, &a.bias, &a.shift, &a.y, &a.mean, &a.rstd});
  GroupNormParams p;
  p.dtype = a.x.dtype();
  p.x = cptr(a.x), p.weight = cptr(a.weight), p.bias = cptr(a.bias), p.shift = cptr(a.shift);
  p.y = mptr(a.y), p.mean = mptr(a.mean), p.rstd = mptr(a.rstd);
  p.batch = a.batch, p.channels = a.channels, p.spatial = a.spatial, p.groups = a.groups, p.eps = a.eps;
  p.silu = a.silu;
  const Tensor partial =
      Tensor::empty({a.batch * a.groups, group_norm_chunks(p), 2}, stat_dtype(p.dtype), a.x.device());
  p.partial = partial.raw_data();
  DeviceGuard guard(device);
  launch_group_norm(p);
}

void fused_group_norm_backward(const GroupNormGradArgs& a) {
  const int device =
      fused_device("group_norm_backward", a.x, {&a.dy, &a.weight, &a.mean, &a.rstd, &a.dx, &a.dweight, &a.dbias});
  GroupNormGradParams p;
  p.dtype = a.x.dtype();
  p.dy = cptr(a.dy), p.x = cptr(a.x), p.weight = cptr(a.weight), p.mean = cptr(a.mean), p.rstd = cptr(a.rstd);
  p.dx = mptr(a.dx), p.dweight = mptr(a.dweight), p.dbias = mptr(a.dbias);
  p.batch = a.batch, p.channels = a.channels, p.spatial = a.spatial, p.groups = a.groups;
  const Tensor sums = Tensor::empty({2, a.batch * a.channels}, stat_dtype(p.dtype), a.x.device());
  p.sums = sums.raw_data();
  DeviceGuard guard(device);
  launch_group_norm_backward(p);
}

void fused_geglu(const GegluArgs& a) {
  const int device = fused_device("geglu", a.x, {&a.y});
  GegluParams p;
  p.dtype = a.x.dtype();
  p.x = cptr(a.x), p.out = mptr(a.y);
  p.rows = a.rows, p.h = a.h, p.approximate = a.approximate;
  DeviceGuard guard(device);
  launch_geglu(p);
}

void fused_geglu_backward(const GegluGradArgs& a) {
  const int device = fused_device("geglu_backward", a.x, {&a.dy, &a.dx});
  GegluParams p;
  p.dtype = a.x.dtype();
  p.x = cptr(a.x), p.dy = cptr(a.dy), p.out = mptr(a.dx);
  p.rows = a.rows, p.h = a.h, p.approximate = a.approximate;
  DeviceGuard guard(device);
  launch_geglu_backward(p);
}

void fused_bias_residual(const BiasResidualArgs& a) {
  const int device = fused_device("bias_residual", a.y, {&a.bias, &a.residual, &a.out});
  BiasResidualParams p;
  p.dtype = a.y.dtype();
  p.y = cptr(a.y), p.bias = cptr(a.bias), p.residual = cptr(a.residual), p.out = mptr(a.out);
  p.rows = a.rows, p.n = a.n, p.inner = a.inner;
  DeviceGuard guard(device);
  launch_bias_residual(p);
}

// The table is cut into launches of at most kMaxUpdateTensors tensors.
void fused_optimizer_update(const OptimizerUpdateArgs& a) {
  if (a.tensors.empty()) return;
  const Tensor& first = a.tensors.front().param;
  const int device = fused_device("optimizer_update", first, {});
  LOOM_CHECK(first.dtype() == DType::F32 || first.dtype() == DType::F64, "cuda optimizer_update: parameters of dtype ",
             first.dtype(), " are not supported (f32 master weights, or f64)");
  OptimizerUpdateParams p;
  p.dtype = first.dtype();
  p.kind = a.kind;
  p.lr = a.lr, p.weight_decay = a.weight_decay, p.momentum = a.momentum, p.dampening = a.dampening;
  p.beta1 = a.beta1, p.beta2 = a.beta2, p.eps = a.eps, p.nesterov = a.nesterov ? 1 : 0;
  DeviceGuard guard(device);
  for (const OptimizerTensor& e : a.tensors) {
    fused_device("optimizer_update", e.param, {&e.grad, &e.state1, &e.state2});
    LOOM_CHECK(e.param.device() == first.device() && e.param.dtype() == first.dtype(),
               "cuda optimizer_update: parameter ", e.param.str(), " differs in device or dtype from ", first.str());
    if (p.count == kMaxUpdateTensors) {
      launch_optimizer_update(p);
      p.count = 0;
      p.total_blocks = 0;
    }
    UpdateTensorParams& t = p.tensors[p.count++];
    t.param = mptr(e.param), t.grad = cptr(e.grad), t.state1 = mptr(e.state1), t.state2 = mptr(e.state2);
    t.numel = e.param.numel();
    t.first_block = p.total_blocks;
    t.step_size = e.step_size, t.inv_bias2_sqrt = e.inv_bias2_sqrt, t.first = e.first ? 1 : 0;
    p.total_blocks += (t.numel + kUpdateChunk - 1) / kUpdateChunk;
  }
  if (p.count > 0) launch_optimizer_update(p);
}

void fused_random(const RandomArgs& a) {
  const int device = fused_device("random", a.out, {});
  RandomParams p;
  p.dtype = a.out.dtype();
  p.kind = a.kind;
  p.out = mptr(a.out);
  p.numel = a.out.numel();
  p.seed = a.seed, p.offset = a.offset;
  p.p = a.p, p.scale = 1.0 / (1.0 - a.p);
  DeviceGuard guard(device);
  launch_random(p);
}

// Like the optimizer update: the gradients are cut into launches of at most kMaxUpdateTensors.
void fused_unscale_check_finite(const UnscaleArgs& a) {
  if (a.grads.empty()) return;
  const Tensor& first = a.grads.front();
  const int device = fused_device("unscale_check_finite", first, {&a.found_inf});
  LOOM_CHECK(a.found_inf.defined() && a.found_inf.dtype() == DType::F32 && a.found_inf.numel() == 1,
             "cuda unscale_check_finite: found_inf must be one f32 element on ", first.device());
  UnscaleParams p;
  p.dtype = first.dtype();
  p.inv_scale = a.inv_scale;
  p.found_inf = static_cast<float*>(a.found_inf.raw_data());
  DeviceGuard guard(device);
  for (const Tensor& g : a.grads) {
    fused_device("unscale_check_finite", g, {});
    LOOM_CHECK(g.device() == first.device() && g.dtype() == first.dtype(), "cuda unscale_check_finite: gradient ",
               g.str(), " differs in device or dtype from ", first.str());
    if (g.numel() == 0) continue;
    if (p.count == kMaxUpdateTensors) {
      launch_unscale_check_finite(p);
      p.count = 0;
      p.total_blocks = 0;
    }
    UnscaleTensorParams& t = p.tensors[p.count++];
    t.data = mptr(g);
    t.numel = g.numel();
    t.first_block = p.total_blocks;
    p.total_blocks += (t.numel + kUpdateChunk - 1) / kUpdateChunk;
  }
  if (p.count > 0) launch_unscale_check_finite(p);
}

}  // namespace loom::cuda
