// Flash attention on CUDA: which kernel family runs a call (cuda_flash.h has the contract).
//   cuda_flash_fwd.cu, cuda_flash_bwd.cu   tensor-core family (bf16 / f16)
//   cuda_flash_tf32.cu, cuda_flash_tf32_bwd.cu  tf32 family (f32 with allow_tf32(): p.tf32)
//   cuda_flash_exact.cu                    exact family (f32 without TF32, f64)
#include <cstdlib>
#include <string>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_flash.h"

namespace loom::cuda {

namespace {

void dispatch(const FlashParams& p, bool backward) {
  switch (p.dtype) {
    case DType::BF16:
    case DType::F16: return backward ? flash_tc_backward(p) : flash_tc_forward(p);
    case DType::F32:
      if (p.tf32) return backward ? flash_tf32_backward(p) : flash_tf32_forward(p);
      return flash_exact(p, backward);
    case DType::F64: return flash_exact(p, backward);
    default: break;
  }
  LOOM_FAIL("attention backend 'flash' does not support dtype ", p.dtype, " on cuda");
}

}  // namespace

int flash_sm_count() {
  static int count = [] {
    int dev = 0, c = 0;
    LOOM_CUDA_CHECK(cudaGetDevice(&dev));
    LOOM_CUDA_CHECK(cudaDeviceGetAttribute(&c, cudaDevAttrMultiProcessorCount, dev));
    return c;
  }();
  return count;
}

bool flash_wgmma_chosen(const FlashParams& p, const char* variable, bool measured_faster) {
  const char* choice = std::getenv(variable);
  const std::string c = choice ? choice : "";
  LOOM_CHECK(c.empty() || c == "mma" || c == "wgmma", variable, "='", c, "' is not mma or wgmma");
  if (c == "mma" || !flash_wgmma_head_dim(p.d)) return false;
  LOOM_CHECK(c.empty() || flash_wgmma_available(), variable, "=wgmma: this build or device has no sm_90a wgmma kernels");
  return flash_wgmma_available() && (c == "wgmma" || measured_faster);
}

bool flash_tensor_core_head_dim(int64_t d) {
  return d == 40 || d == 64 || d == 72 || d == 80 || d == 96 || d == 128 || d == 160;
}

void launch_flash_forward(const FlashParams& p) {
  if (p.n == 0 || p.q_len == 0) return;
  dispatch(p, false);
}

void launch_flash_backward(const FlashParams& p) {
  if (p.n == 0) return;
  dispatch(p, true);
}

}  // namespace loom::cuda
