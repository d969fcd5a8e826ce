// The one registration point for device backends: the only file that maps a
// DeviceType to its Backend. The CUDA entry points come from tensor/cuda/
// (the real backend, or cuda_stub.cpp when built without CUDA).
#include "tensor/backend.h"
#include "tensor/cpu/cpu_backend.h"
#include "tensor/cuda/cuda_backend.h"

namespace loom {

const char* op_kind_name(OpKind k) {
  switch (k) {
    case OpKind::Copy: return "copy";
    case OpKind::Fill: return "fill";
    case OpKind::Unary: return "unary";
    case OpKind::Binary: return "binary";
    case OpKind::Reduce: return "reduce";
    case OpKind::Gemm: return "gemm";
    case OpKind::Softmax: return "softmax";
    case OpKind::FlashAttention: return "flash attention";
    case OpKind::LayerNorm: return "layer_norm";
    case OpKind::GroupNorm: return "group_norm";
    case OpKind::Geglu: return "geglu";
    case OpKind::OptimizerUpdate: return "optimizer_update";
    case OpKind::BiasResidual: return "bias_residual";
    case OpKind::Random: return "random";
    case OpKind::UnscaleCheckFinite: return "unscale_check_finite";
    case OpKind::Conv2d: return "conv2d";
    case OpKind::Conv2dLibrary: return "conv2d (library)";
    case OpKind::GemmBias: return "gemm with bias";
    case OpKind::Im2colNormed: return "im2col of group-normed values";
    case OpKind::LinearGeglu: return "linear + geglu";
  }
  return "unknown";
}

// ---- default slots of the fused ops: a backend that lacks a kernel says so ----------------

void Backend::softmax_backward(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t) {
  missing_fused_kernel("softmax_backward", name());
}

void Backend::flash_attention_check(const FlashAttentionArgs& a) const {
  LOOM_FAIL("attention backend 'flash' does not support device ", a.q.device(), " (backend '", name(),
            "' has no flash attention kernel)");
}
void Backend::flash_attention_forward(const FlashAttentionArgs& a, const Tensor&, const Tensor&) {
  flash_attention_check(a);
}
void Backend::flash_attention_backward(const FlashAttentionArgs& a, const Tensor&, const Tensor&, const Tensor&,
                                       const Tensor&, const Tensor&, const Tensor&) {
  flash_attention_check(a);
}

int cuda_device_count() {
  static const int count = cuda_runtime_device_count();
  return count;
}

bool cuda_backend_built() { return cuda_backend() != nullptr; }

Backend& backend_for(Device device) {
  if (device.is_cpu()) return *cpu_backend();
  Backend* cuda = cuda_backend();
  LOOM_CHECK(cuda != nullptr, "device ", device, ": loom was built without CUDA (no nvcc found at build time)");
  LOOM_CHECK(device.index >= 0 && device.index < cuda_device_count(), "device ", device,
             ": no such CUDA device (", cuda_device_count(), " present)");
  return *cuda;
}

Backend& backend_for(const char* op, OpKind kind, Device device, DType dtype) {
  Backend& b = backend_for(device);
  LOOM_CHECK(b.supports(kind, dtype), op, ": not supported on device ", device, " for dtype ", dtype,
             " (backend '", b.name(), "' has no ", op_kind_name(kind), " kernel for ", dtype, ")");
  return b;
}

}  // namespace loom
