// Backend::gemm through cuBLAS.
//
// loom's GEMM is row-major, cuBLAS is column-major. A row-major m×n matrix C with
// leading dim ldc is, read column-major, the n×m matrix Cᵀ with the same leading
// dim. So C = op(A)·op(B) is computed as
//     Cᵀ (n×m) = op(B)ᵀ (n×k) · op(A)ᵀ (k×m)
// i.e. cuBLAS gets (B, A) swapped and (m, n) swapped; each operand keeps its own
// transpose flag, since a row-major stored X read column-major is already Xᵀ.
//
// Precision: f32 runs with CUBLAS_DEFAULT_MATH (set explicitly: no TF32), f64 in
// f64, bf16 and f16 through cublasGemmStridedBatchedEx with CUBLAS_COMPUTE_32F.
//
// GEMMs with at most 16 output columns and a row-major A (LoRA's thin down GEMM and dZ) go to
// the thin kernel of cuda_gemm_thin.cu instead (cuda_thin_gemm_fits).
//
// One handle per device, created on first use and kept for the process (never
// destroyed: the CUDA runtime may be gone by static destruction time). A handle
// is used by one thread at a time: each call holds its device's mutex.
#include <cublas_v2.h>

#include <algorithm>
#include <climits>
#include <mutex>

#include "tensor/cuda/cuda_backend.h"
#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_gemm_wgmma.h"
#include "tensor/precision.h"

namespace loom::cuda {
namespace {

struct HandleSlot {
  std::mutex mu;  // held for the whole cuBLAS call
  cublasHandle_t handle = nullptr;
  void* workspace = nullptr;  // kGemmWorkspaceBytes
};

// The slot for `device`, creating the handle on first use. The caller has
// `device` current.
HandleSlot& handle_slot(int device) {
  return device_slot<HandleSlot>(device, [](HandleSlot& s) {
    LOOM_CUBLAS_CHECK(cublasCreate(&s.handle));
    LOOM_CUBLAS_CHECK(cublasSetMathMode(s.handle, CUBLAS_DEFAULT_MATH));  // no TF32
    LOOM_CUBLAS_CHECK(cublasSetPointerMode(s.handle, CUBLAS_POINTER_MODE_HOST));
    LOOM_CUBLAS_CHECK(cublasSetStream(s.handle, compute_stream()));  // the device's compute stream
    // A workspace of our own (after cublasSetStream, which resets it): cuBLAS then allocates
    // nothing per call, which a CUDA graph capture needs (cuda_graph.cu). 32 MiB is cuBLAS's own
    // default on Hopper; never freed, like the handle.
    LOOM_CUDA_CHECK(cudaMalloc(&s.workspace, kGemmWorkspaceBytes));
    LOOM_CUBLAS_CHECK(cublasSetWorkspace(s.handle, s.workspace, kGemmWorkspaceBytes));
  });
}

int checked_int(int64_t v, const char* what) {
  LOOM_CHECK(v >= 0 && v <= INT_MAX, "cuda gemm: ", what, " = ", v, " does not fit cuBLAS's 32-bit int");
  return int(v);
}

cublasOperation_t op_of(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

}  // namespace

void* gemm_workspace(int device) { return handle_slot(device).workspace; }

void launch_gemm(const GemmBatch& g) {
  LOOM_CHECK(g.device.is_cuda(), "cuda gemm: device ", g.device, " is not a CUDA device");
  LOOM_CHECK(g.m >= 0 && g.n >= 0 && g.k >= 0 && g.batch >= 0, "cuda gemm: negative size (m ", g.m, ", n ",
             g.n, ", k ", g.k, ", batch ", g.batch, ")");
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  // Row-major leading-dim requirements (see backend.h).
  LOOM_CHECK(g.lda >= (g.trans_a ? g.m : g.k) && g.ldb >= (g.trans_b ? g.k : g.n) && g.ldc >= g.n,
             "cuda gemm: leading dims too small (lda ", g.lda, ", ldb ", g.ldb, ", ldc ", g.ldc, " for m ", g.m,
             ", n ", g.n, ", k ", g.k, ", trans_a ", g.trans_a, ", trans_b ", g.trans_b, ")");
  LOOM_CHECK(g.batch == 1 || g.stride_c != 0, "cuda gemm: a batch of ", g.batch,
             " needs a non-zero C batch stride");

  if (g.bias) {  // a Linear's bias in the epilogue (cuda_gemm_lt.cu)
    launch_gemm_with_bias(g);
    return;
  }
  if (cuda_thin_gemm_fits(g)) {  // n ≤ 16 columns, A row-major: LoRA's down GEMM and dZ
    launch_thin_gemm(g);
    return;
  }
  if (gemm_wgmma(g)) return;  // LOOM_GEMM_WGMMA=all: loom's own Hopper kernel (cuda_gemm_wgmma.cu)

  // Column-major problem: C' (m' × n') = op(A') · op(B') with A' = B, B' = A.
  const int m = checked_int(g.n, "n"), n = checked_int(g.m, "m"), k = checked_int(g.k, "k");
  const int batch = checked_int(g.batch, "batch");
  // cuBLAS wants every leading dim ≥ 1 even where a matrix is empty (k == 0).
  const int lda = checked_int(g.ldb > 0 ? g.ldb : 1, "ldb");
  const int ldb = checked_int(g.lda > 0 ? g.lda : 1, "lda");
  const int ldc = checked_int(g.ldc, "ldc");
  const cublasOperation_t transa = op_of(g.trans_b), transb = op_of(g.trans_a);
  const long long stride_a = g.stride_b, stride_b = g.stride_a, stride_c = g.stride_c;
  const void* a = g.b;
  const void* b = g.a;

  DeviceGuard guard(g.device.index);
  HandleSlot& slot = handle_slot(g.device.index);
  std::lock_guard<std::mutex> lock(slot.mu);
  cublasHandle_t h = slot.handle;

  struct Mark {  // LOOM_CUDA_PROFILE: charge the call to a shape class (thin = LoRA-like)
    const GemmBatch& g;
    ~Mark() {
      if (!kernel_profile_enabled()) return;
      const bool thin = std::min(g.m, g.n) <= 16 || g.k <= 16;
      kernel_profile_mark(g.batch > 1 ? (thin ? "cublas gemm batched thin" : "cublas gemm batched")
                                      : (thin ? "cublas gemm thin (a side <= 16)" : "cublas gemm"));
    }
  } mark{g};
  switch (g.dtype) {
    case DType::F32: {
      const float alpha = float(g.alpha), beta = float(g.beta);
      if (allow_tf32()) {  // --precision tf32: f32 storage, TF32 tensor cores, f32 accumulation
        LOOM_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, transa, transb, m, n, k, &alpha, a, CUDA_R_32F, lda, stride_a,
                                                     b, CUDA_R_32F, ldb, stride_b, &beta, g.c, CUDA_R_32F, ldc,
                                                     stride_c, batch, CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
        return;
      }
      LOOM_CUBLAS_CHECK(cublasSgemmStridedBatched(h, transa, transb, m, n, k, &alpha, static_cast<const float*>(a),
                                                  lda, stride_a, static_cast<const float*>(b), ldb, stride_b,
                                                  &beta, static_cast<float*>(g.c), ldc, stride_c, batch));
      return;
    }
    case DType::F64: {
      const double alpha = g.alpha, beta = g.beta;
      LOOM_CUBLAS_CHECK(cublasDgemmStridedBatched(h, transa, transb, m, n, k, &alpha,
                                                  static_cast<const double*>(a), lda, stride_a,
                                                  static_cast<const double*>(b), ldb, stride_b, &beta,
                                                  static_cast<double*>(g.c), ldc, stride_c, batch));
      return;
    }
    case DType::BF16:
    case DType::F16: {
      const cudaDataType_t t = g.dtype == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
      const float alpha = float(g.alpha), beta = float(g.beta);
      LOOM_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, transa, transb, m, n, k, &alpha, a, t, lda, stride_a, b, t,
                                                   ldb, stride_b, &beta, g.c, t, ldc, stride_c, batch,
                                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      return;
    }
    case DType::I64: break;
  }
  LOOM_FAIL("cuda gemm: not supported by the cuda backend for dtype ", g.dtype);
}

}  // namespace loom::cuda
