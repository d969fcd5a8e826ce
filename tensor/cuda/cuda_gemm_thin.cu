// Thin GEMMs: few output columns (n ≤ 16), A read row by row. LoRA's down-projection
// Z [M, r] = X [M, K]·Aᵀ (op(B) = A stored [r, K], trans_b) and the backward's dZ [M, r] = dY·B
// (B stored [out, r]) are of this shape: memory-bound, the big operand read once.
//
//   C [m, n] = alpha · A [m, k] · op(B) [k, n] + beta · C        (row-major, GemmBatch's contract)
//
// Host checks (cuda_thin_gemm_fits) -> ThinGemmParams -> launcher -> kernel:
//   * op(B) is staged once per block in shared memory as Bs [kN][k_pad] in B's dtype (kN = n
//     rounded up to 4, 8 or 16; k_pad = k rounded up to one 16-byte vector), zero-padded, so a
//     lane reads the 8 (bf16 / f16) or 4 (f32) k-values of a column as one 16-byte vector with
//     no bank conflict.
//   * One warp per row of A (grid-stride over rows; the grid is capped at the blocks that fit on
//     the GPU at once, so op(B) is staged once per resident block): lane l reads A[row, 16-byte vector l + 32·t],
//     with 16-byte loads where A and lda·sizeof(T) are 16-byte aligned, scalar loads otherwise
//     and at the ragged end of the row; kN dot products accumulate in f32.
//   * A warp butterfly reduces the kN sums; lane j < n writes C[row, j] = alpha·s + beta·C
//     (C is not read when beta == 0, so NaN there does not survive, as with cuBLAS).
// Deterministic: each output element is one lane's fixed-order sum and a fixed butterfly.
//
// The backward's dA [r, K] = dZᵀ·X (m ≤ 16) and dB [K, r] = dYᵀ·Z (n ≤ 16) have A transposed:
// a sum over the k = M rows of two row-major stored operands, a wide one [k, W] and a small one
// [k, S ≤ 16]. Two passes, deterministic (no atomics):
//   1. reduce_k_partial_kernel: block (column tile, split of the rows): its 8 warps take the
//      split's rows in turn, lane l holds kC columns of the wide operand (one 8- or 16-byte load
//      per row) and the S values of the small row (broadcast loads), accumulating kS·kC f32
//      products; the warps are summed through shared memory into partial [split][S][W] (f32).
//   2. reduce_k_finish_kernel: C = alpha·Σ_split partial + beta·C, the splits summed in order.
// f32 / bf16 / f16 only; f64 and everything else stays on cuBLAS (cuda_gemm.cu).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "tensor/cuda/cuda_backend.h"
#include "tensor/cuda/cuda_device.cuh"
#include "tensor/tensor.h"

namespace loom::cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps: 8 rows in flight per block
constexpr int kMaxN = 16;
constexpr size_t kMaxSmem = 96 * 1024;  // op(B) staged per block: two blocks fit on an SM
constexpr int64_t kMinRows = 64, kMinK = 32;

struct ThinGemmParams {
  const void* a = nullptr;  // [m, k], row stride lda
  const void* b = nullptr;  // op(B) [k, n]: stored [n, k] (trans_b) or [k, n], row stride ldb
  void* c = nullptr;        // [m, n], row stride ldc
  int64_t m = 0, n = 0, k = 0, k_pad = 0, lda = 0, ldb = 0, ldc = 0;
  bool trans_b = false;
  bool vec_a = false;  // A's rows start 16-byte aligned: vector loads
  float alpha = 1.0f, beta = 0.0f;
};

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

int padded_n(int64_t n) { return n <= 4 ? 4 : n <= 8 ? 8 : 16; }

size_t elem_size(DType t) { return t == DType::F32 ? 4 : 2; }

// Bytes of shared memory for op(B) staged as [kN][k_pad].
size_t staged_bytes(DType t, int64_t n, int64_t k) {
  const int64_t per_vec = int64_t(16 / elem_size(t));
  return size_t(padded_n(n)) * size_t(round_up(k, per_vec)) * elem_size(t);
}

// Off unless LOOM_THIN_GEMM=1 or set_cuda_thin_gemm(true): on the SDXL UNet LoRA step (H200,
// batch 4, docs/gpu-bench.md) cuBLAS ran these shapes faster (step 303.7 vs 312.7 ms).
std::atomic<int> thin_gemm_state{-1};  // -1: not decided yet; 0 off; 1 on

bool thin_gemm_enabled() {
  int s = thin_gemm_state.load(std::memory_order_relaxed);
  if (s < 0) {
    const char* v = std::getenv("LOOM_THIN_GEMM");
    s = v && std::strcmp(v, "1") == 0 ? 1 : 0;
    thin_gemm_state.store(s, std::memory_order_relaxed);
  }
  return s == 1;
}

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) return 132;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    LOOM_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

template <typename T, int kN>
__global__ void __launch_bounds__(kThreads) thin_gemm_kernel(ThinGemmParams p) {
  constexpr int kVec = int(16 / sizeof(T));  // elements per 16-byte vector
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* bs = reinterpret_cast<T*>(smem_raw);  // [kN][k_pad]: bs[j·k_pad + kk] = op(B)(kk, j)
  const T* b = static_cast<const T*>(p.b);
  const int64_t staged = int64_t(kN) * p.k_pad;
  for (int64_t idx = threadIdx.x; idx < staged; idx += kThreads) {
    const int64_t j = idx / p.k_pad, kk = idx - j * p.k_pad;
    T v = narrow<T>(0.0f);
    if (j < p.n && kk < p.k) v = p.trans_b ? b[j * p.ldb + kk] : b[kk * p.ldb + j];
    bs[idx] = v;
  }
  __syncthreads();

  const int lane = int(threadIdx.x) % 32;
  const int64_t warp = threadIdx.x / 32, warps = kThreads / 32;
  const T* a = static_cast<const T*>(p.a);
  T* c = static_cast<T*>(p.c);
  for (int64_t row = int64_t(blockIdx.x) * warps + warp; row < p.m; row += int64_t(gridDim.x) * warps) {
    const T* ar = a + row * p.lda;
    float acc[kN];
#pragma unroll
    for (int j = 0; j < kN; ++j) acc[j] = 0.0f;
    // k0: the first of this lane's kVec k-values; k0 < k ≤ k_pad and k_pad is a multiple of kVec,
    // so bs[j·k_pad + k0 .. + kVec) is inside row j of the staged op(B).
    for (int64_t k0 = int64_t(lane) * kVec; k0 < p.k; k0 += 32 * kVec) {
      float xv[kVec];
      if (p.vec_a && k0 + kVec <= p.k) {
        const Pack16<T> pk = *reinterpret_cast<const Pack16<T>*>(ar + k0);
#pragma unroll
        for (int e = 0; e < kVec; ++e) xv[e] = float(widen(pk.v[e]));
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) xv[e] = k0 + e < p.k ? float(widen(ar[k0 + e])) : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const Pack16<T> bv = *reinterpret_cast<const Pack16<T>*>(bs + j * p.k_pad + k0);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[j] += xv[e] * float(widen(bv.v[e]));
      }
    }
#pragma unroll
    for (int j = 0; j < kN; ++j) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], off);
    }
    T* cr = c + row * p.ldc;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      if (lane == j && j < p.n) {
        float v = p.alpha * acc[j];
        if (p.beta != 0.0f) v += p.beta * float(widen(cr[j]));
        cr[j] = narrow<T>(v);
      }
    }
  }
}

template <typename T, int kN>
void launch_thin(const ThinGemmParams& p, int device) {
  static std::atomic<bool> smem_cap_set[64];  // per instantiation: the dynamic smem cap, once per device
  if (device < 0 || device >= 64 || !smem_cap_set[device].load()) {
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(thin_gemm_kernel<T, kN>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         int(kMaxSmem)));
    if (device >= 0 && device < 64) smem_cap_set[device].store(true);
  }
  const size_t smem = size_t(kN) * size_t(p.k_pad) * sizeof(T);
  // As many blocks as fit on the GPU at once (each stages op(B) once and then walks its rows);
  // the occupancy query is made once per (device, shared memory size).
  static std::mutex mu;
  static std::map<std::pair<int, size_t>, int> per_sm_cache;
  int per_sm = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = per_sm_cache.find({device, smem});
    if (it == per_sm_cache.end()) {
      LOOM_CUDA_CHECK(
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, thin_gemm_kernel<T, kN>, kThreads, smem));
      per_sm_cache[{device, smem}] = per_sm;
    } else {
      per_sm = it->second;
    }
  }
  const int64_t blocks_for_rows = (p.m + kThreads / 32 - 1) / (kThreads / 32);
  const int64_t blocks = std::min<int64_t>(blocks_for_rows, int64_t(sm_count(device)) * std::max(per_sm, 1));
  thin_gemm_kernel<T, kN><<<unsigned(blocks), kThreads, smem, compute_stream()>>>(p);
  check_last_launch("thin gemm kernel (n <= 16)");
}

// ---- A transposed: the sum over k (dA = dZᵀ·X, dB = dYᵀ·Z) ---------------------------------

constexpr int64_t kMinReduceRows = 256, kRowsPerSplitMin = 64;

struct ReduceKParams {
  const void* wide = nullptr;   // [k, W], row stride ld_wide
  const void* small = nullptr;  // [k, S], row stride ld_small
  float* partial = nullptr;     // [splits][S][W]
  void* c = nullptr;            // C [S, W] (small_is_m) or [W, S], row stride ldc
  int64_t ld_wide = 0, ld_small = 0, ldc = 0;
  int64_t k = 0, S = 0, W = 0, rows_per_split = 0, splits = 0;
  bool small_is_m = true;
  bool vec_wide = false;  // the wide rows are aligned for kC-element vector loads
  float alpha = 1.0f, beta = 0.0f;
};

// Columns of the wide operand per lane: one 16-byte vector, or 8 bytes for 16-bit types with
// kS = 16 (kS·kC ≤ 64 accumulators per lane).
template <typename T, int kS>
struct ReduceCols {
  static constexpr int value = (sizeof(T) == 2 && kS < 16) ? 8 : 4;
};

template <typename T, int kS, int kC>
__global__ void __launch_bounds__(kThreads) reduce_k_partial_kernel(ReduceKParams p) {
  constexpr int kWarps = kThreads / 32;
  __shared__ float red[kWarps][32 * kC];
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  const int64_t tile0 = int64_t(blockIdx.x) * 32 * kC;  // first column of this block's tile
  const int64_t col0 = tile0 + int64_t(lane) * kC;       // first of this lane's kC columns
  const int64_t t_begin = int64_t(blockIdx.y) * p.rows_per_split;
  const int64_t t_end = t_begin + p.rows_per_split < p.k ? t_begin + p.rows_per_split : p.k;
  const T* wide = static_cast<const T*>(p.wide);
  const T* small = static_cast<const T*>(p.small);
  float acc[kS][kC];
#pragma unroll
  for (int s = 0; s < kS; ++s) {
#pragma unroll
    for (int c = 0; c < kC; ++c) acc[s][c] = 0.0f;
  }
  for (int64_t t = t_begin + warp; t < t_end; t += kWarps) {
    const T* wr = wide + t * p.ld_wide;
    float wv[kC];
    if (p.vec_wide && col0 + kC <= p.W) {
      const PackN<T, kC> pk = *reinterpret_cast<const PackN<T, kC>*>(wr + col0);
#pragma unroll
      for (int c = 0; c < kC; ++c) wv[c] = float(widen(pk.v[c]));
    } else {
#pragma unroll
      for (int c = 0; c < kC; ++c) wv[c] = col0 + c < p.W ? float(widen(wr[col0 + c])) : 0.0f;
    }
    const T* sr = small + t * p.ld_small;
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      const float sv = s < p.S ? float(widen(sr[s])) : 0.0f;
#pragma unroll
      for (int c = 0; c < kC; ++c) acc[s][c] += sv * wv[c];
    }
  }
  // The warps' sums, one small row at a time, through shared memory (p.S is uniform: every
  // thread reaches every barrier).
  float* out = p.partial + int64_t(blockIdx.y) * p.S * p.W;
#pragma unroll
  for (int s = 0; s < kS; ++s) {
    if (s < p.S) {
#pragma unroll
      for (int c = 0; c < kC; ++c) red[warp][lane * kC + c] = acc[s][c];
      __syncthreads();
      for (int i = int(threadIdx.x); i < 32 * kC; i += kThreads) {
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) v += red[w][i];
        if (tile0 + i < p.W) out[int64_t(s) * p.W + tile0 + i] = v;
      }
      __syncthreads();
    }
  }
}

template <typename T>
__global__ void reduce_k_finish_kernel(ReduceKParams p) {
  T* c = static_cast<T*>(p.c);
  const int64_t total = p.S * p.W;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = i / p.W, w = i - s * p.W;
    float v = 0.0f;
    for (int64_t sp = 0; sp < p.splits; ++sp) v += p.partial[(sp * p.S + s) * p.W + w];
    const int64_t at = p.small_is_m ? s * p.ldc + w : w * p.ldc + s;
    float out = p.alpha * v;
    if (p.beta != 0.0f) out += p.beta * float(widen(c[at]));
    c[at] = narrow<T>(out);
  }
}

bool reduce_k_fits(const GemmBatch& g) {
  const int64_t small = std::min(g.m, g.n);
  return g.batch == 1 && g.trans_a && !g.trans_b && small >= 1 && small <= kMaxN && g.k >= kMinReduceRows &&
         g.lda >= g.m && g.ldb >= g.n && g.ldc >= g.n;
}

bool rows_fit(const GemmBatch& g) {
  return g.batch == 1 && !g.trans_a && g.n >= 1 && g.n <= kMaxN && g.m >= kMinRows && g.k >= kMinK &&
         staged_bytes(g.dtype, g.n, g.k) <= kMaxSmem && g.lda >= g.k && g.ldc >= g.n &&
         g.ldb >= (g.trans_b ? g.k : g.n);
}

template <typename T, int kS>
void launch_reduce_k(ReduceKParams p, int device) {
  constexpr int kC = ReduceCols<T, kS>::value;
  const int64_t col_tiles = (p.W + 32 * kC - 1) / (32 * kC);
  const int64_t target_blocks = int64_t(sm_count(device)) * 4;
  const int64_t max_splits = std::max<int64_t>(1, p.k / kRowsPerSplitMin);
  int64_t splits = std::min(std::max<int64_t>(1, (target_blocks + col_tiles - 1) / col_tiles), max_splits);
  p.rows_per_split = (p.k + splits - 1) / splits;
  p.splits = (p.k + p.rows_per_split - 1) / p.rows_per_split;  // no empty split
  const uintptr_t align = uintptr_t(kC) * sizeof(T);
  p.vec_wide = reinterpret_cast<uintptr_t>(p.wide) % align == 0 && (uintptr_t(p.ld_wide) * sizeof(T)) % align == 0;
  const Tensor partial = Tensor::empty({p.splits, p.S, p.W}, DType::F32, Device::cuda(device));
  p.partial = static_cast<float*>(partial.raw_data());
  const dim3 grid(unsigned(col_tiles), unsigned(p.splits));
  reduce_k_partial_kernel<T, kS, kC><<<grid, kThreads, 0, compute_stream()>>>(p);
  check_last_launch("thin gemm kernel (sum over k, partials)");
  const int64_t finish_blocks = std::min<int64_t>((p.S * p.W + kThreads - 1) / kThreads, int64_t(sm_count(device)) * 8);
  reduce_k_finish_kernel<T><<<unsigned(finish_blocks), kThreads, 0, compute_stream()>>>(p);
  check_last_launch("thin gemm kernel (sum over k, finish)");
}  // `partial` is freed here; the caching allocator reuses it only for later work on this stream

void launch_reduce_k_gemm(const GemmBatch& g) {
  ReduceKParams p;
  p.small_is_m = g.m <= g.n && g.m <= kMaxN;
  // op(A) = A_storedᵀ with A stored [k, m] (lda); B stored [k, n] (ldb).
  if (p.small_is_m) {
    p.small = g.a, p.ld_small = g.lda, p.S = g.m;
    p.wide = g.b, p.ld_wide = g.ldb, p.W = g.n;
  } else {
    p.small = g.b, p.ld_small = g.ldb, p.S = g.n;
    p.wide = g.a, p.ld_wide = g.lda, p.W = g.m;
  }
  p.c = g.c, p.ldc = g.ldc, p.k = g.k;
  p.alpha = float(g.alpha), p.beta = float(g.beta);
  dispatch_float(g.dtype, "cuda thin gemm", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>) {
      LOOM_FAIL("cuda thin gemm: f64 runs on cuBLAS");
    } else {
      switch (padded_n(p.S)) {
        case 4: launch_reduce_k<T, 4>(p, g.device.index); return;
        case 8: launch_reduce_k<T, 8>(p, g.device.index); return;
        default: launch_reduce_k<T, kMaxN>(p, g.device.index); return;
      }
    }
  });
}

}  // namespace

void launch_thin_gemm(const GemmBatch& g) {
  LOOM_CHECK(cuda_thin_gemm_fits(g), "cuda thin gemm: the problem (m ", g.m, ", n ", g.n, ", k ", g.k, ", batch ",
             g.batch, ", trans_a ", g.trans_a, ", dtype ", g.dtype, ") is not a thin one");
  DeviceGuard guard(g.device.index);
  if (g.trans_a) {
    launch_reduce_k_gemm(g);
    return;
  }
  ThinGemmParams p;
  p.a = g.a, p.b = g.b, p.c = g.c;
  p.m = g.m, p.n = g.n, p.k = g.k;
  p.lda = g.lda, p.ldb = g.ldb, p.ldc = g.ldc;
  p.trans_b = g.trans_b;
  p.alpha = float(g.alpha), p.beta = float(g.beta);
  const int64_t esize = int64_t(elem_size(g.dtype));
  p.k_pad = round_up(g.k, 16 / esize);
  p.vec_a = reinterpret_cast<uintptr_t>(g.a) % 16 == 0 && (g.lda * esize) % 16 == 0;
  dispatch_float(g.dtype, "cuda thin gemm", [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>) {
      LOOM_FAIL("cuda thin gemm: f64 runs on cuBLAS");
    } else {
      switch (padded_n(g.n)) {
        case 4: launch_thin<T, 4>(p, g.device.index); return;
        case 8: launch_thin<T, 8>(p, g.device.index); return;
        default: launch_thin<T, kMaxN>(p, g.device.index); return;
      }
    }
  });
}

}  // namespace loom::cuda

namespace loom {

bool cuda_thin_gemm_fits(const GemmBatch& g) {
  const bool dtype_ok = g.dtype == DType::F32 || g.dtype == DType::BF16 || g.dtype == DType::F16;
  return cuda::thin_gemm_enabled() && dtype_ok && (g.trans_a ? cuda::reduce_k_fits(g) : cuda::rows_fit(g));
}

void set_cuda_thin_gemm(bool on) { cuda::thin_gemm_state.store(on ? 1 : 0, std::memory_order_relaxed); }

}  // namespace loom
