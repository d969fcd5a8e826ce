// Tensor maps for TMA copies (cuda_tma_host.h).
#include "tensor/cuda/cuda_tma_host.h"

#include <cuda_runtime.h>

#include <sstream>

#include "tensor/error.h"

namespace loom::cuda {
namespace {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver; null when the driver does not have it.
EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

}  // namespace

bool tensor_maps_available() { return encode_tiled() != nullptr; }

CUtensorMap tensor_map_sw128(DType dtype, int rank, const void* base, const cuuint64_t* dims,
                             const cuuint64_t* strides, const cuuint32_t* box, const std::string& what) {
  LOOM_CHECK(encode_tiled(), what, ": this CUDA driver has no cuTensorMapEncodeTiled");
  LOOM_CHECK(rank >= 1 && rank <= 5, what, ": tensor map of rank ", rank);
  const cuuint32_t steps[5] = {1, 1, 1, 1, 1};
  CUtensorMap map;
  const CUresult r = encode_tiled()(
      &map, dtype == DType::BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      cuuint32_t(rank), const_cast<void*>(base), dims, strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    auto outermost_first = [rank](const auto* v) {
      std::ostringstream os;
      for (int i = rank - 1; i >= 0; --i) os << v[i] << (i ? " x " : "");
      return os.str();
    };
    LOOM_FAIL(what, ": cuTensorMapEncodeTiled failed (", int(r), ") for a tensor of ", outermost_first(dims),
              ", box ", outermost_first(box));
  }
  return map;
}

}  // namespace loom::cuda
