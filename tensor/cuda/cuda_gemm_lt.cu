// Backend::gemm with a bias (GemmBatch::bias, OpKind::GemmBias: a Linear's y = x·Wᵀ + b) for
// bf16 / f16, through cuBLASLt's bias epilogue: the bias is added to the f32 accumulator before
// the one rounding to the output dtype, and no pass over y is spent on it. On Stable Diffusion's
// UNet that pass was the largest elementwise cost of the forward (docs/gpu-bench.md).
//
// The column-major problem is cuda_gemm.cu's: loom's row-major C = op(A)·op(B) is cuBLAS's
// Cᵀ (n×m) = op(B)ᵀ · op(A)ᵀ, so loom's per-column bias (length n) is a per-row bias of the
// column-major D, which is what CUBLASLT_EPILOGUE_BIAS adds.
//
// A plan (descriptors and the algorithm) is made once per shape, leading dims and operand
// alignments and kept for the process, as cuBLAS keeps its handle (cuda_gemm.cu); the bias pointer
// is set on the plan's descriptor at each call, under the device's mutex. The algorithm is the
// heuristic's first, or, with LOOM_GEMM_TUNE=K (K ≥ 2), the fastest of the heuristic's first K
// timed on the call's own operands (C written, not read) when the plan is made outside a CUDA
// graph capture and deterministic_algorithms() is off (tensor/determinism.h). Where cuBLASLt
// offers no algorithm (or the problem is thin or unaligned), the
// plain GEMM runs and a kernel adds the bias (add_row_bias_kernel): the same values, rounded twice.
// LOOM_GEMM_WGMMA=bias (or all) runs loom's own Hopper kernel instead where it fits (cuda_gemm_wgmma.cu).
#include <cublasLt.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "tensor/cuda/cuda_backend.h"
#include "tensor/cuda/cuda_device.cuh"
#include "tensor/cuda/cuda_gemm_wgmma.h"
#include "tensor/determinism.h"

namespace loom::cuda {
namespace {

struct LtPlan {
  bool usable = false;  // false: cuBLASLt offered no algorithm; the fallback runs
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;  // of the column-major A', B', C'
  cublasLtMatmulAlgo_t algo{};
};

struct LtSlot {
  std::mutex mu;  // held for the whole call (the plans' descriptors are shared)
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;  // the device's GEMM workspace (gemm_workspace), shared with cuBLAS
  std::map<std::vector<int64_t>, LtPlan> plans;  // never freed, like the handle
};

// The slot of `device`, made on first use; the caller has `device` current.
LtSlot& lt_slot(int device) {
  return device_slot<LtSlot>(device, [device](LtSlot& s) {
    LOOM_CUBLAS_CHECK(cublasLtCreate(&s.handle));
    s.workspace = gemm_workspace(device);
  });
}

// The largest power of two ≤ 256 that divides the address (cuBLASLt's alignment preferences).
int64_t alignment_of(const void* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  int64_t align = 256;
  while (align > 1 && addr % uintptr_t(align) != 0) align /= 2;
  return align;
}

// The alignment every matrix of a strided batch keeps: its base's, and its stride's in bytes.
int64_t batch_alignment(const void* base, int64_t batch, int64_t stride, DType t) {
  int64_t align = alignment_of(base);
  if (batch > 1 && stride != 0) {
    const int64_t bytes = stride * int64_t(itemsize(t));
    while (align > 1 && bytes % align != 0) align /= 2;
  }
  return align;
}

cublasOperation_t op_of(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

template <typename V>
void set_desc(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t attr, const V& v) {
  LOOM_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &v, sizeof(v)));
}

template <typename V>
void set_pref(cublasLtMatmulPreference_t p, cublasLtMatmulPreferenceAttributes_t attr, const V& v) {
  LOOM_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(p, attr, &v, sizeof(v)));
}

// The column-major stored matrix (rows × cols, leading dim ld) of one operand.
cublasLtMatrixLayout_t make_layout(cudaDataType_t t, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t l = nullptr;
  LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, t, uint64_t(rows), uint64_t(cols), ld));
  return l;
}

// Sets a layout's batch count and stride (elements between consecutive matrices; 0 shares one).
void set_batch(cublasLtMatrixLayout_t l, int64_t batch, int64_t stride) {
  if (batch == 1) return;
  const int32_t count = int32_t(batch);
  LOOM_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
  LOOM_CUBLAS_CHECK(
      cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
}

// LOOM_GEMM_TUNE (read when a plan is made): how many of the heuristic's algorithms to time; 1
// (the default) takes its first untimed.
int tune_candidates() {
  const char* env = std::getenv("LOOM_GEMM_TUNE");
  if (!env || !*env) return 1;
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  LOOM_CHECK(end && *end == '\0' && v >= 1 && v <= 32, "LOOM_GEMM_TUNE='", env, "' is not a count from 1 to 32");
  return deterministic_algorithms() ? 1 : int(v);  // a timed choice may differ between processes
}

bool stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  LOOM_CUDA_CHECK(cudaStreamIsCapturing(compute_stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// One call of `g` through plan p with algorithm `algo` (alpha 1, beta 0).
cublasStatus_t run_plan(cublasLtHandle_t handle, void* workspace, const LtPlan& p, const cublasLtMatmulAlgo_t& algo,
                        const GemmBatch& g) {
  const float alpha = 1.f, beta = 0.f;
  return cublasLtMatmul(handle, p.desc, &alpha, g.b, p.a, g.a, p.b, &beta, g.c, p.c, g.c, p.c, &algo, workspace,
                        kGemmWorkspaceBytes, compute_stream());
}

// The fastest of `results` on g's own operands (C written): each timed twice after one
// warm-up call, the better time counting. Candidates that do not run are passed over.
int fastest_algorithm(cublasLtHandle_t handle, void* workspace, const LtPlan& p,
                      const std::vector<cublasLtMatmulHeuristicResult_t>& results, const GemmBatch& g) {
  cudaEvent_t start = nullptr, stop = nullptr;
  LOOM_CUDA_CHECK(cudaEventCreate(&start));
  LOOM_CUDA_CHECK(cudaEventCreate(&stop));
  int best = 0;
  float best_ms = -1.f;
  for (size_t i = 0; i < results.size(); ++i) {
    if (run_plan(handle, workspace, p, results[i].algo, g) != CUBLAS_STATUS_SUCCESS) continue;
    float ms = -1.f;
    for (int rep = 0; rep < 2; ++rep) {
      LOOM_CUDA_CHECK(cudaEventRecord(start, compute_stream()));
      LOOM_CUBLAS_CHECK(run_plan(handle, workspace, p, results[i].algo, g));
      LOOM_CUDA_CHECK(cudaEventRecord(stop, compute_stream()));
      LOOM_CUDA_CHECK(cudaEventSynchronize(stop));
      float t = 0.f;
      LOOM_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
      if (ms < 0.f || t < ms) ms = t;
    }
    if (best_ms < 0.f || ms < best_ms) best = int(i), best_ms = ms;
  }
  LOOM_CUDA_CHECK(cudaEventDestroy(start));
  LOOM_CUDA_CHECK(cudaEventDestroy(stop));
  return best;
}

// The plan of `g` (bias set): D'[i] (n × m, column-major) = op(B[i])ᵀ·op(A[i])ᵀ + bias, i < batch
// (a strided batch; the bias shared: its batch stride 0).
LtPlan make_plan(cublasLtHandle_t handle, void* workspace, const GemmBatch& g, cudaDataType_t t) {
  LtPlan p;
  const int64_t mp = g.n, np = g.m, k = g.k;  // column-major sizes
  const cublasOperation_t ta = op_of(g.trans_b), tb = op_of(g.trans_a);
  LOOM_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  set_desc(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, ta);
  set_desc(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, tb);
  set_desc(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, CUBLASLT_EPILOGUE_BIAS);
  set_desc(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
  p.a = ta == CUBLAS_OP_N ? make_layout(t, mp, k, g.ldb) : make_layout(t, k, mp, g.ldb);  // A' = B
  p.b = tb == CUBLAS_OP_N ? make_layout(t, k, np, g.lda) : make_layout(t, np, k, g.lda);  // B' = A
  p.c = make_layout(t, mp, np, g.ldc);
  set_batch(p.a, g.batch, g.stride_b);
  set_batch(p.b, g.batch, g.stride_a);
  set_batch(p.c, g.batch, g.stride_c);
  if (g.batch > 1) set_desc(p.desc, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, int64_t(0));

  cublasLtMatmulPreference_t pref = nullptr;
  LOOM_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, uint64_t(kGemmWorkspaceBytes));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, uint32_t(batch_alignment(g.b, g.batch, g.stride_b, g.dtype)));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, uint32_t(batch_alignment(g.a, g.batch, g.stride_a, g.dtype)));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, uint32_t(batch_alignment(g.c, g.batch, g.stride_c, g.dtype)));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, uint32_t(batch_alignment(g.c, g.batch, g.stride_c, g.dtype)));
  const bool tune = !stream_capturing();
  std::vector<cublasLtMatmulHeuristicResult_t> results(size_t(tune ? tune_candidates() : 1));
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.a, p.b, p.c, p.c, pref,
                                                           int(results.size()), results.data(), &found);
  LOOM_CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
  p.usable = st == CUBLAS_STATUS_SUCCESS && found > 0;
  if (!p.usable) return p;
  results.resize(size_t(found));
  p.algo = results[size_t(results.size() > 1 ? fastest_algorithm(handle, workspace, p, results, g) : 0)].algo;
  return p;
}

// Runs `g` through cuBLASLt; false (nothing launched) where it cannot.
bool try_lt(const GemmBatch& g) {
  if (g.batch > 65535 || g.alpha != 1.0 || g.beta != 0.0 || alignment_of(g.bias) < 16) return false;
  if (g.dtype != DType::BF16 && g.dtype != DType::F16) return false;
  const cudaDataType_t t = g.dtype == DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
  LtSlot& slot = lt_slot(g.device.index);
  std::lock_guard<std::mutex> lock(slot.mu);
  const std::vector<int64_t> key = {int64_t(g.dtype), g.trans_a, g.trans_b, g.m, g.n, g.k, g.lda, g.ldb, g.ldc,
                                    g.batch, g.stride_a, g.stride_b, g.stride_c,
                                    batch_alignment(g.a, g.batch, g.stride_a, g.dtype),
                                    batch_alignment(g.b, g.batch, g.stride_b, g.dtype),
                                    batch_alignment(g.c, g.batch, g.stride_c, g.dtype),
                                    int64_t(deterministic_algorithms())};  // a timed plan is not kept then
  auto it = slot.plans.find(key);
  if (it == slot.plans.end()) it = slot.plans.emplace(key, make_plan(slot.handle, slot.workspace, g, t)).first;
  LtPlan& plan = it->second;
  if (!plan.usable) return false;
  set_desc(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, g.bias);
  const cublasStatus_t st = run_plan(slot.handle, slot.workspace, plan, plan.algo, g);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED) {  // not launched: this shape takes the fallback from now on
    plan.usable = false;
    return false;
  }
  LOOM_CUBLAS_CHECK(st);
  if (kernel_profile_enabled()) kernel_profile_mark("cublasLt gemm + bias");
  return true;
}

// C[i][r, j] += bias[j] over the m×n block of every C[i] (the fallback's second pass).
template <typename T>
__global__ void add_row_bias_kernel(T* c, const T* __restrict__ bias, int64_t m, int64_t n, int64_t ldc,
                                    int64_t stride_c) {
  T* ci = c + int64_t(blockIdx.y) * stride_c;
  const int64_t total = m * n;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, j = i - r * n;
    T& v = ci[r * ldc + j];
    v = narrow<T>(widen(v) + widen(bias[j]));
  }
}

}  // namespace

void launch_gemm_with_bias(const GemmBatch& g) {
  LOOM_CHECK(g.bias != nullptr, "cuda gemm: launch_gemm_with_bias without a bias");
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  DeviceGuard guard(g.device.index);
  if (!cuda_thin_gemm_fits(g) && (gemm_wgmma(g) || try_lt(g))) return;
  GemmBatch plain = g;
  plain.bias = nullptr;
  launch_gemm(plain);
  LOOM_CHECK(g.batch <= 65535, "cuda gemm: a batch of ", g.batch, " with a bias exceeds 65535");
  dispatch_float(g.dtype, "cuda gemm bias", [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(grid_for(g.m * g.n), unsigned(g.batch));
    add_row_bias_kernel<T><<<grid, kThreads, 0, compute_stream()>>>(static_cast<T*>(g.c), static_cast<const T*>(g.bias),
                                                                    g.m, g.n, g.ldc, g.stride_c);
    check_last_launch("add_row_bias_kernel");
  });
}

}  // namespace loom::cuda

namespace loom {
bool cuda_gemm_wgmma(const GemmBatch& g) {
  if (g.m == 0 || g.n == 0 || g.batch == 0) return false;
  cuda::DeviceGuard guard(g.device.index);
  return cuda::gemm_wgmma(g);
}
}  // namespace loom
