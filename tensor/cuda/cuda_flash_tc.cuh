// Internal to tensor/cuda/cuda_flash_*.cu: the tensor-core family's device helpers (mma.sync,
// ldmatrix, cp.async, the bf16 / f16 packing), its tile shapes and the head dims it is built
// for. Everything here is in an anonymous namespace: each kernel file has its own copy.
// Layout conventions and the algorithm: the comment at the top of cuda_flash_fwd.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_flash.h"

// The head dims of the tensor-core kernels (flash_tensor_core_head_dim must agree).
#define LOOM_FLASH_HEAD_DIMS(X) X(40) X(64) X(72) X(80) X(96) X(128) X(160)

namespace loom::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// How far (log2 units) the forward's running row maximum may lag the true one before O and l are
// rescaled: P then reaches at most 2^8, safe in f32 sums and in bf16 / f16, and after the first
// tiles almost no tile rescales (FlashAttention-4's conditional rescaling). The LSE m + log2(l)
// is the same.
constexpr float kMaxLag = 8.f;

// ================================ tensor-core family =================================

template <typename T>
struct Half2;
template <>
struct Half2<__nv_bfloat16> {
  static __device__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Half2<__half> {
  static __device__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ float to_float(__half x) { return __half2float(x); }
  static __device__ __half from_float(float x) { return __float2half_rn(x); }
};

// c += a·b, 16×8×16, f32 accumulators.
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The B fragment (k 16 × n 8) of a row-major [k][n] tile in shared memory, rows `row0`…,
// columns `col0`…, row stride `ld`: ldmatrix.x2.trans (lanes 0–15 give the row addresses).
template <typename T>
__device__ __forceinline__ void ldmatrix_b_trans(uint32_t* b, const T* base, int row0, int col0, int ld, int lane) {
  const T* p = base + (row0 + (lane & 15)) * ld + col0;
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(addr));
}

// ldmatrix.x4 forms (lane l gives the address of row l % 8 of matrix l / 8); each replaces
// four 32-bit shared loads. Rows are 16-byte aligned and, with the (dp + 8) padding, the 8
// rows of one matrix fall into 8 distinct 16-byte bank groups.
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t* r, const void* p) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// The A fragment (rows row0…row0+15, k0…k0+15) of a row-major [m][k] tile.
template <typename T>
__device__ __forceinline__ void ldsm_a(uint32_t* a, const T* base, int row0, int k0, int ld, int lane) {
  ldsm_x4(a, base + (row0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}
// Two B fragments (k0…k0+15; n-blocks n0…n0+7 → b[0..1], n0+8…n0+15 → b[2..3]) whose
// transpose is a row-major [n][k] tile.
template <typename T>
__device__ __forceinline__ void ldsm_b_pair(uint32_t* b, const T* base, int n0, int k0, int ld, int lane) {
  ldsm_x4(b, base + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + k0 + ((lane >> 3) & 1) * 8);
}
// Two B fragments (k0…k0+15; n0…n0+7 → b[0..1], n0+8…n0+15 → b[2..3]) of a row-major [k][n] tile.
template <typename T>
__device__ __forceinline__ void ldsm_b_trans_pair(uint32_t* b, const T* base, int k0, int n0, int ld, int lane) {
  ldsm_x4_trans(b, base + (k0 + (lane & 15)) * ld + n0 + (lane >> 4) * 8);
}

// 2^x (ex2.approx, ≤ 2 ulp; −inf → 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte asynchronous global → shared copy (L2 only); zero-fills when !in.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool in) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(in ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// 4-byte asynchronous copy; zero-fills when !in.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool in) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(addr), "l"(src), "r"(in ? 4 : 0));
}

// p[0] += a, p[1] += b (one vector atomic on sm_90; p 8-byte aligned).
__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// Problem n's row 0 (elements from the tensor's start) and row stride in a q/k/v/out-like tensor
// of rows `width` wide, in either layout of FlashParams (cuda_flash.h).
struct FlashRows {
  int64_t base, stride;
};
__device__ __forceinline__ FlashRows flash_rows(const FlashParams& p, int64_t n, int64_t len, int width) {
  if (!p.packed) return {n * len * width, width};
  return {(n / p.heads) * len * p.heads * width + (n % p.heads) * width, p.heads * width};
}

// Copies rows [r0, r0 + rows) of a [len, d] matrix whose rows lie src_stride elements apart into
// a [rows][ld] tile with cp.async, zero beyond len and in columns d…DP (16-byte chunks; d and
// src_stride are multiples of 8); the copy lands after cp_async_commit, cp_async_wait_all and
// __syncthreads.
template <typename T, int DP>
__device__ __forceinline__ void load_tile_async(T* tile, int ld, const T* src, int64_t r0, int rows, int64_t len,
                                                int d, int64_t src_stride, int tid, int threads) {
  constexpr int kChunks = DP / 8;
  for (int idx = tid; idx < rows * kChunks; idx += threads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool in = r0 + r < len && c < d;
    cp_async16(tile + r * ld + c, in ? src + (r0 + r) * src_stride + c : src, in);
  }
}

// Byte offset of 16-byte chunk `chunk` (0…7) of row `row` in a 128-byte-swizzled tile (rows of
// 128 bytes, the chunk stored at c ^ (row % 8): the layout wgmma reads, cuda_wgmma.cuh).
__device__ __forceinline__ int sw128_offset(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// Rows [r0, r0 + kRows) of a [len, D] matrix (D ≤ 64 a multiple of 8, rows `stride` elements
// apart) into a 128-byte-swizzled [kRows][64] tile with cp.async by kThreads threads (tid one of
// them): only the D / 8 chunks of 16 bytes that hold data, zero-filled past len. Columns D…63 are
// not written: wgmma reads columns up to the next multiple of 16 (S = Q·Kᵀ's k-steps), and at
// D = 40 that chunk (columns 40…47) is zeroed once per buffer by zero_sw128_pad.
// Eight threads per row, thread tid on chunk tid % 8 (idle past D / 8) of rows tid / 8 + P·i,
// P = kThreads / 8: a warp reads 4 whole rows (coalesced), and as P is a multiple of 8 a thread's
// swizzle never changes, so each further chunk costs an address add and its bounds check.
// load_sw128_tiles does this for kMats matrices of one shape and stride at once (the backward's Q
// and dO tiles, the forward's K and V), sharing the row arithmetic. Lands like load_tile_async.
template <typename T, int D, int kRows, int kThreads, int kMats>
__device__ __forceinline__ void load_sw128_tiles(T* const (&tiles)[kMats], const T* const (&srcs)[kMats], int64_t r0,
                                                 int64_t len, int64_t stride, int tid) {
  static_assert(D % 8 == 0 && D <= 64, "rows of at most 64 elements, whole 16-byte chunks");
  constexpr int kPass = kThreads / 8;  // rows per pass
  static_assert(kThreads % 64 == 0, "passes of a multiple of 8 rows: the swizzle stays");
  const int c = tid % 8, r = tid / 8;
  if (D % 64 != 0 && c >= D / 8) return;
  const int dst = sw128_offset(r, c);
  const int64_t step = kPass * stride;
  int64_t at = (r0 + r) * stride + 8 * c;
#pragma unroll
  for (int i = 0; i < (kRows + kPass - 1) / kPass; ++i, at += step) {
    if (kRows % kPass != 0 && r + i * kPass >= kRows) break;
    const bool in = r0 + r + i * kPass < len;
#pragma unroll
    for (int m = 0; m < kMats; ++m)
      cp_async16(reinterpret_cast<unsigned char*>(tiles[m]) + dst + i * kPass * 128, in ? srcs[m] + at : srcs[m], in);
  }
}

template <typename T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_sw128_tile(T* tile, const T* src, int64_t r0, int64_t len, int64_t stride,
                                                int tid) {
  T* const tiles[1] = {tile};
  const T* const srcs[1] = {src};
  load_sw128_tiles<T, D, kRows, kThreads>(tiles, srcs, r0, len, stride, tid);
}

template <typename T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_sw128_tile_pair(T* tile_a, const T* src_a, T* tile_b, const T* src_b, int64_t r0,
                                                     int64_t len, int64_t stride, int tid) {
  T* const tiles[2] = {tile_a, tile_b};
  const T* const srcs[2] = {src_a, src_b};
  load_sw128_tiles<T, D, kRows, kThreads, 2>(tiles, srcs, r0, len, stride, tid);
}

// Zeroes the chunk of columns D…D + 7 of every row of a [kRows][64] swizzled tile when D is not a
// multiple of 16 (D = 40: the last k-step of 16 reads columns 40…47), with plain shared stores:
// once per buffer, before its first use (made visible to wgmma by the fence.proxy.async and the
// barrier that precede every use).
template <int D, int kRows, int kThreads>
__device__ __forceinline__ void zero_sw128_pad(void* tile, int tid) {
  if constexpr (D % 16 != 0) {
    for (int r = tid; r < kRows; r += kThreads)
      *reinterpret_cast<uint4*>(static_cast<unsigned char*>(tile) + sw128_offset(r, D / 8)) = make_uint4(0, 0, 0, 0);
  }
}

// O += P·V for each 16-row slice a of this warp over one tile of kCols keys (a multiple of 16):
// P is the slice's score accumulators s[a] (after the exponential, f32), packed to T pairs (a C
// tile pair is the A fragment of that k-step); V is a row-major [kCols][ld] tile in shared memory;
// the head dim D in n-steps of 8 (pairs through ldmatrix.x4.trans, an odd last one through .x2).
template <typename T, int D, int kAtoms, int kCols>
__device__ __forceinline__ void accumulate_pv(float (&o)[kAtoms][D / 8][4], const float (&s)[kAtoms][kCols / 8][4],
                                              const T* sV, int ld, int lane) {
#pragma unroll
  for (int kk = 0; kk < kCols / 16; ++kk) {
    uint32_t pa[kAtoms][4];
#pragma unroll
    for (int a = 0; a < kAtoms; ++a) {
      pa[a][0] = Half2<T>::pack(s[a][2 * kk][0], s[a][2 * kk][1]);
      pa[a][1] = Half2<T>::pack(s[a][2 * kk][2], s[a][2 * kk][3]);
      pa[a][2] = Half2<T>::pack(s[a][2 * kk + 1][0], s[a][2 * kk + 1][1]);
      pa[a][3] = Half2<T>::pack(s[a][2 * kk + 1][2], s[a][2 * kk + 1][3]);
    }
#pragma unroll
    for (int j = 0; j + 1 < D / 8; j += 2) {
      uint32_t b[4];
      ldsm_b_trans_pair(b, sV, kk * 16, j * 8, ld, lane);
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) {
        mma16816(o[a][j], pa[a], b, T());
        mma16816(o[a][j + 1], pa[a], b + 2, T());
      }
    }
    if constexpr (D / 8 % 2 == 1) {
      uint32_t b[2];
      ldmatrix_b_trans(b, sV, kk * 16, (D / 8 - 1) * 8, ld, lane);
#pragma unroll
      for (int a = 0; a < kAtoms; ++a) mma16816(o[a][D / 8 - 1], pa[a], b, T());
    }
  }
}

// Writes one query row of a slice's output: row g (h = 0) or g + 8 (h = 1) of the accumulators
// oa, divided by the row's sum l (already summed over the row's 4 lanes), as T pairs at `out_row`
// (columns 8j + 2t, 8j + 2t + 1); lane t = 0 writes the row's log-sum-exp (m + log2 l)·ln 2 at *lse.
template <typename T, int D>
__device__ __forceinline__ void store_output_row(T* out_row, float* lse, const float (&oa)[D / 8][4], int h, float m,
                                                 float l, int t) {
  const float inv = 1.f / l;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const uint32_t packed = Half2<T>::pack(oa[j][2 * h] * inv, oa[j][2 * h + 1] * inv);
    *reinterpret_cast<uint32_t*>(out_row + j * 8 + 2 * t) = packed;
  }
  if (t == 0) *lse = (m + log2f(l)) * kLn2;
}

template <int D>
struct TcShape {
  static constexpr int kDp = (D + 15) / 16 * 16;  // QKᵀ's k-dim, zero-padded in shared memory
  static constexpr int kLd = kDp + 8;             // shared-memory row stride (elements)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 64;                // queries per tile (16 per warp)
  static constexpr int kCols = 64;                // keys per tile
};

// Calls f(std::integral_constant<int, D>{}) for head dim d among LOOM_FLASH_HEAD_DIMS (the host
// side of every tensor-core launcher); other dims throw "attention backend 'flash' does not
// support head dim d on cuda" followed by `where` (e.g. " in f32 with TF32").
template <typename F>
void dispatch_head_dim(int64_t d, const char* where, F&& f) {
  switch (d) {
#define LOOM_FLASH_CASE(D) \
  case D:                  \
    return f(std::integral_constant<int, D>{});
    LOOM_FLASH_HEAD_DIMS(LOOM_FLASH_CASE)
#undef LOOM_FLASH_CASE
  }
  LOOM_FAIL("attention backend 'flash' does not support head dim ", d, " on cuda", where);
}

// The additive mask entry (query qi, key kj) of problem row n, in the log2 domain.
template <typename T>
__device__ __forceinline__ float mask_log2(const FlashParams& p, const T* mask, int64_t n, int64_t qi, int64_t kj) {
  const int64_t b = p.mask_batches == 1 ? 0 : n / p.heads;
  const int64_t r = p.mask_rows == 1 ? 0 : qi;
  return Half2<T>::to_float(mask[(b * p.mask_rows + r) * p.k_len + kj]) * kLog2e;
}

}  // namespace
}  // namespace loom::cuda
