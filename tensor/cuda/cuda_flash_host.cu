// Host side of the CUDA flash attention (cuda_flash.h): checks → FlashParams → launcher.
#include <cstdint>
#include <string>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_flash.h"
#include "tensor/determinism.h"
#include "tensor/precision.h"

namespace loom::cuda {

namespace {

bool aligned16(const Tensor& t) { return loom::cuda::aligned16(t.raw_data()); }

// Whether a call in dtype t runs on tensor cores: bf16 / f16 always, f32 with allow_tf32().
bool on_tensor_cores(DType t) { return t == DType::BF16 || t == DType::F16 || (t == DType::F32 && allow_tf32()); }
// "bf16", or "f32 with TF32": the dtype as the errors name it.
std::string precision_words(DType t) { return std::string(dtype_name(t)) + (t == DType::F32 ? " with TF32" : ""); }

FlashParams params_of(const FlashAttentionArgs& a) {
  FlashParams p;
  p.dtype = a.q.dtype();
  // TF32's backward adds with atomics: the exact f32 kernels under deterministic_algorithms()
  p.tf32 = p.dtype == DType::F32 && allow_tf32() && !deterministic_algorithms();
  p.q = a.q.raw_data(), p.k = a.k.raw_data(), p.v = a.v.raw_data();
  p.mask = a.mask.defined() ? a.mask.raw_data() : nullptr;
  p.n = a.q.size(0), p.q_len = a.q.size(1), p.k_len = a.k.size(1), p.d = a.q.size(2), p.dv = a.v.size(2);
  p.heads = a.heads;
  if (a.packed_heads) {  // [B, len, heads·d]
    p.packed = true;
    p.n = a.q.size(0) * a.heads, p.d = a.q.size(2) / a.heads, p.dv = a.v.size(2) / a.heads;
  }
  p.mask_batches = a.mask.defined() ? a.mask.size(0) : 0;
  p.mask_rows = a.mask.defined() ? a.mask.size(1) : 0;
  p.scale = a.scale, p.causal = a.causal;
  return p;
}

void* data_or_null(const Tensor& t) { return t.defined() ? t.raw_data() : nullptr; }

}  // namespace

void flash_check(const FlashAttentionArgs& a) {
  const DType t = a.q.dtype();
  const Device dev = a.q.device();
  LOOM_CHECK(t == DType::BF16 || t == DType::F16 || t == DType::F32 || t == DType::F64,
             "attention backend 'flash' does not support dtype ", t, " on ", dev);
  for (const Tensor* x : {&a.q, &a.k, &a.v, &a.mask})
    LOOM_CHECK(!x->defined() || (x->is_contiguous() && x->device() == dev && x->dtype() == t),
               "attention backend 'flash' on ", dev, ": q, k, v and mask must be contiguous, on one device, of one dtype");
  const int64_t h = a.packed_heads ? a.heads : 1;
  const bool tc = on_tensor_cores(t);
  if (a.packed_heads) {
    LOOM_CHECK(tc, "attention backend 'flash' on ", dev, " takes the packed-heads layout in bf16 / f16 (and f32 with ",
               "TF32) only, not ", t, allow_tf32() ? "" : " without TF32");
    LOOM_CHECK(h >= 1 && a.q.size(2) % h == 0 && a.k.size(2) % h == 0 && a.v.size(2) % h == 0,
               "attention backend 'flash' on ", dev, ": packed q ", a.q.shape(), ", k ", a.k.shape(), ", v ",
               a.v.shape(), " do not split into ", h, " heads");
  }
  const int64_t d = a.q.size(2) / h, dv = a.v.size(2) / h;
  if (tc) {
    LOOM_CHECK(d == dv, "attention backend 'flash' does not support q/k head dim ", d, " != v head dim ", dv, " on ",
               dev, " in ", precision_words(t));
    LOOM_CHECK(flash_tensor_core_head_dim(d), "attention backend 'flash' does not support head dim ", d, " on ", dev,
               " in ", precision_words(t), " (its ", t == DType::F32 ? "TF32 " : "",
               "tensor-core kernels cover 40, 64, 72, 80, 96, 128, 160)");
    for (const Tensor* x : {&a.q, &a.k, &a.v, &a.mask})
      LOOM_CHECK(!x->defined() || aligned16(*x), "attention backend 'flash' on ", dev,
                 ": inputs must start at a 16-byte boundary");
  } else {
    LOOM_CHECK(std::max(d, dv) <= kFlashExactMaxHeadDim, "attention backend 'flash' does not support head dim ",
               std::max(d, dv), " on ", dev, " in ", t, " (at most ", kFlashExactMaxHeadDim, ")");
  }
  LOOM_CHECK(a.q.size(0) * h <= 65535, "attention backend 'flash' does not support more than 65535 batch·heads rows on ",
             dev, " (got ", a.q.size(0) * h, ")");
}

void flash_forward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse) {
  flash_check(a);
  DeviceGuard guard(a.q.device().index);
  FlashParams p = params_of(a);
  p.out = out.raw_data();
  p.lse = lse.raw_data();
  launch_flash_forward(p);
}

void flash_backward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                    const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  flash_check(a);
  const Device dev = a.q.device();
  DeviceGuard guard(dev.index);
  FlashParams p = params_of(a);
  p.out = out.raw_data();
  p.lse = lse.raw_data();
  p.grad_out = grad_out.raw_data();
  LOOM_CHECK(!on_tensor_cores(p.dtype) || aligned16(grad_out), "attention backend 'flash' on ", dev,
             ": the output gradient must start at a 16-byte boundary");
  p.dq = data_or_null(dq), p.dk = data_or_null(dk), p.dv_out = data_or_null(dv);
  const Tensor delta = Tensor::empty({p.n, p.q_len}, flash_stats_dtype(p.dtype), dev);  // either layout
  p.delta = delta.raw_data();
  Tensor dq_acc, dk_acc, dv_acc;  // f32 accumulators of the tensor-core path
  if (p.dtype == DType::BF16 || p.dtype == DType::F16) {
    if (dq.defined() && !flash_dq_separate()) dq_acc = Tensor::empty(a.q.shape(), DType::F32, dev);
    if (!flash_tc_backward_writes_kv(p)) {
      dk_acc = Tensor::empty(a.k.shape(), DType::F32, dev);
      dv_acc = Tensor::empty(a.v.shape(), DType::F32, dev);
    }
    p.dq_accum = static_cast<float*>(data_or_null(dq_acc));
    p.dk_accum = static_cast<float*>(data_or_null(dk_acc));
    p.dv_accum = static_cast<float*>(data_or_null(dv_acc));
  }
  launch_flash_backward(p);
}

}  // namespace loom::cuda
