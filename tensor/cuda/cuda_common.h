// Internal to tensor/cuda/: error checking for CUDA runtime and cuBLAS calls, a
// scoped device guard, and the launch check called after every kernel launch.
//
//   LOOM_CUDA_CHECK(cudaMalloc(&p, n));      // throws loom::Error on failure
//   LOOM_CUBLAS_CHECK(cublasCreate(&h));     // likewise for cuBLAS statuses
//   kernel<<<grid, block>>>(params);
//   check_last_launch("unary_kernel");       // launch-configuration errors
//
// Every message starts with "cuda" and names the failing expression, the error
// (name and description) and the file and line of the call.
//
// It also declares the launchers (cuda_kernels.cu, cuda_gemm.cu) and their plain
// parameter structs; those of the fused family are in cuda_fused.h, and the
// device-side helpers shared by kernel files in cuda_device.cuh. The flow of every op is: host checks in cuda_backend.cu ->
// a parameter struct -> a launcher (dtype/op dispatch, grid shape) -> a kernel.
// Launchers run on the current device (the caller holds a DeviceGuard) and on
// its compute stream (compute_stream()); they return without synchronizing.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "tensor/backend.h"
#include "tensor/error.h"

namespace loom::cuda {

// Throws loom::Error for a failed CUDA runtime call. Clears a non-sticky error
// first, so that a later check_last_launch does not report it a second time.
[[noreturn]] inline void throw_cuda_error(const char* expr, cudaError_t err, const char* file, int line,
                                          const char* func) {
  (void)cudaGetLastError();
  ::loom::detail::throw_error(
      ::loom::detail::concat("cuda: ", expr, " failed: ", cudaGetErrorName(err), " (",
                             cudaGetErrorString(err), ") at ", file, ":", line),
      func);
}

[[noreturn]] inline void throw_cublas_error(const char* expr, cublasStatus_t status, const char* file,
                                            int line, const char* func) {
  ::loom::detail::throw_error(
      ::loom::detail::concat("cuda (cuBLAS): ", expr, " failed: ", cublasGetStatusName(status), " (",
                             cublasGetStatusString(status), ") at ", file, ":", line),
      func);
}

}  // namespace loom::cuda

#define LOOM_CUDA_CHECK(expr)                                                               \
  do {                                                                                      \
    const cudaError_t loom_cuda_err_ = (expr);                                              \
    if (loom_cuda_err_ != cudaSuccess)                                                      \
      ::loom::cuda::throw_cuda_error(#expr, loom_cuda_err_, __FILE__, __LINE__, __func__); \
  } while (0)

#define LOOM_CUBLAS_CHECK(expr)                                                                  \
  do {                                                                                           \
    const cublasStatus_t loom_cublas_status_ = (expr);                                           \
    if (loom_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                            \
      ::loom::cuda::throw_cublas_error(#expr, loom_cublas_status_, __FILE__, __LINE__, __func__); \
  } while (0)

namespace loom::cuda {

// Makes `device` current for the guard's lifetime and restores the previous
// current device afterwards (errors while restoring are ignored: a destructor
// must not throw).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    LOOM_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      LOOM_CUDA_CHECK(cudaSetDevice(device));
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_ && cudaSetDevice(previous_) != cudaSuccess) (void)cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// The compute stream of the current device: every kernel, asynchronous copy / memset, cuBLAS
// call and timing event of the backend is queued on it (one per device, created on first use;
// cuda_stream.cu). It is a blocking stream, so the synchronous host <-> device copies
// (cudaMemcpy on the legacy stream) stay ordered with it; a stream of its own is what CUDA graph
// capture needs.
cudaStream_t compute_stream();

// LOOM_CUDA_PROFILE=1 in the environment: the time of every launch is charged to its name and
// a table goes to stderr at exit (cuda_profile.cu). `name` must be a string literal.
bool kernel_profile_enabled();
void kernel_profile_mark(const char* name);

// Called right after every kernel launch: reports a launch-configuration error
// (bad grid, too much shared memory, no kernel image for this GPU) naming the kernel.
inline void check_last_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    ::loom::detail::throw_error(::loom::detail::concat("cuda: launch of ", kernel, " failed: ",
                                                       cudaGetErrorName(err), " (", cudaGetErrorString(err),
                                                       ")"),
                                kernel);
  if (kernel_profile_enabled()) kernel_profile_mark(kernel);
}

// Launch shapes shared by the elementwise kernels: 256 threads per block and a
// grid-stride loop, so the grid is capped and every kernel handles any size.
constexpr int kThreads = 256;
inline unsigned grid_for(int64_t n, int64_t threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  constexpr int64_t kMaxBlocks = 65535;
  return unsigned(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// Whether p lies on a 16-byte boundary (the vector paths' 16-byte packs).
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The `Slot` of `device` (a library handle and what goes with it), made by make(slot) on first use
// with `device` current, and kept for the process: never destroyed, as the CUDA runtime may be gone
// by static destruction time. One registry per instantiation: fetch each Slot type from one place.
template <typename Slot, typename Make>
Slot& device_slot(int device, Make&& make) {
  static std::mutex* registry_mu = new std::mutex();
  static auto* slots = new std::map<int, std::unique_ptr<Slot>>();
  std::lock_guard<std::mutex> lock(*registry_mu);
  std::unique_ptr<Slot>& slot = (*slots)[device];
  if (!slot) {
    auto fresh = std::make_unique<Slot>();
    make(*fresh);
    slot = std::move(fresh);
  }
  return *slot;
}

// ---- launcher parameters ------------------------------------------------------------

// Strided operands support up to this many dims (after merging dims that are
// contiguous with one another in every operand).
constexpr int kMaxDims = 8;

// dst[idx] = cast(src[idx]) for every index idx of shape[0..ndim). Strides in
// elements, any sign, 0 allowed for src. dst and src point at element (0,...,0).
struct CopyParams {
  void* dst = nullptr;
  const void* src = nullptr;
  DType dst_dtype = DType::F32, src_dtype = DType::F32;
  int64_t numel = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t dst_strides[kMaxDims] = {};
  int64_t src_strides[kMaxDims] = {};
};

// dst[0..numel) = value (converted on the host exactly as the CPU backend does).
struct FillParams {
  void* dst = nullptr;
  DType dtype = DType::F32;
  int64_t numel = 0;
  double value = 0.0;
};

// out[i] = op(in[i], scalar), i < numel; both contiguous, same dtype (not I64).
struct UnaryParams {
  UnaryOp op = UnaryOp::Neg;
  DType dtype = DType::F32;
  void* out = nullptr;
  const void* in = nullptr;
  int64_t numel = 0;
  double scalar = 0.0;
};

// out[idx] = op(a[idx], b[idx]) over shape[0..ndim); out contiguous, a and b
// strided (stride 0 = broadcast); one dtype (not I64).
struct BinaryParams {
  BinaryOp op = BinaryOp::Add;
  DType dtype = DType::F32;
  void* out = nullptr;
  const void* a = nullptr;
  const void* b = nullptr;
  int64_t numel = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t a_strides[kMaxDims] = {};
  int64_t b_strides[kMaxDims] = {};
};

// in contiguous [outer, n, inner] -> out contiguous [outer, inner]; one dtype (not I64).
// Sum of an empty range is 0, Max of an empty range is -inf; Max propagates NaN.
struct ReduceParams {
  ReduceOp op = ReduceOp::Sum;
  DType dtype = DType::F32;
  void* out = nullptr;
  const void* in = nullptr;
  int64_t outer = 0, n = 0, inner = 0;
};

// Along the last dim of contiguous [rows, n]: softmax or log_softmax; one dtype (not I64).
struct SoftmaxParams {
  DType dtype = DType::F32;
  void* out = nullptr;
  const void* in = nullptr;
  int64_t rows = 0, n = 0;
  bool log = false;
};

// Softmax's backward: dx = y∘(dy − Σ_j dy∘y) along rows of contiguous [rows, n]; dx may alias dy.
struct SoftmaxGradParams {
  DType dtype = DType::F32;
  void* dx = nullptr;
  const void* y = nullptr;
  const void* dy = nullptr;
  int64_t rows = 0, n = 0;
};

// cuda_kernels.cu
void launch_copy(const CopyParams& p);
void launch_fill(const FillParams& p);
void launch_unary(const UnaryParams& p);
void launch_binary(const BinaryParams& p);
// Add with one operand [B, S, C] viewed as [B, C, S] and the other contiguous, through tiles
// (cuda_binary_transposed.cu); false, launching nothing, when p is not that problem.
bool launch_add_transposed(const BinaryParams& p);
void launch_reduce(const ReduceParams& p);
void launch_softmax(const SoftmaxParams& p);
void launch_softmax_backward(const SoftmaxGradParams& p);
// cuda_gemm.cu: g.device.index selects the device (the caller need not hold a guard).
void launch_gemm(const GemmBatch& g);
// The device's GEMM workspace (kGemmWorkspaceBytes, cuda_gemm.cu; `device` current): cuBLAS's,
// shared with cuBLASLt (cuda_gemm_lt.cu), whose calls are ordered with cuBLAS's on the compute
// stream. Allocated once, so that no GEMM allocates inside a CUDA graph capture.
constexpr size_t kGemmWorkspaceBytes = size_t(32) << 20;
void* gemm_workspace(int device);
// cuda_gemm_thin.cu: a GEMM with n ≤ 16 output columns and a row-major A, one warp per row of A
// (cuda_thin_gemm_fits in cuda_backend.h says which; launch_gemm sends them there).
void launch_thin_gemm(const GemmBatch& g);
// g with g.bias set (cuda_gemm_lt.cu): cuBLASLt's bias epilogue, else the GEMM and a bias pass.
void launch_gemm_with_bias(const GemmBatch& g);

}  // namespace loom::cuda
