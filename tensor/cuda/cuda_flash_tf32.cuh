// Internal to tensor/cuda/cuda_flash_tf32*.cu: device helpers of the TF32 flash family (f32
// inputs under --precision tf32; mma.sync m16n8k8 with TF32 operands and f32 accumulators).
// Everything is in an anonymous namespace (one copy per kernel file), like cuda_flash_tc.cuh,
// whose cp.async, exp2, layout and atomic helpers this header reuses.
//
// Fragment layouts (PTX ISA, mma.m16n8k8 .tf32, g = lane / 4, t = lane % 4):
//   A 16×8 (m×k):  a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
//   B 8×8  (k×n):  b0 (k t, n g), b1 (k t+4, n g)
//   C 16×8:        c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1)
// The k index of a product is only a slot: A and B must agree on which column of k lies in slot
// t and slot t+4, nothing else. Two assignments are used:
//   kStd   slot t → k0+t, slot t+4 → k0+t+4 — operands whose k runs along shared-memory rows
//          ([m][k] or [n][k] tiles);
//   kPair  slot t → k0+2t, slot t+4 → k0+2t+1 — the k of an accumulator tile: lane (g, t) holds
//          columns 2t, 2t+1 of a C tile, so C tile kk (columns 8kk..8kk+7) is an A fragment as
//          is (P and dS go from accumulators into the next product without shared memory); the
//          matching B operand is a [k][n] tile read at rows k0+2t, k0+2t+1.
// Shared-memory rows of the q/k/v/dO tiles are D + 4 floats (≡ 4 mod 8): kStd reads
// (g·ld + t) and kPair reads ((2t+e)·ld + g) then hit 32 distinct banks.
#pragma once

#include "tensor/cuda/cuda_flash_tc.cuh"

namespace loom::cuda {
namespace {

// f32 → TF32 (round to nearest, ties away from zero; 10 mantissa bits kept), as an mma operand.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// c += a·b, 16×8×8, TF32 operands, f32 accumulators.
__device__ __forceinline__ void mma_tf32(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A (rows r0…r0+15, k0…k0+7) of a row-major [m][k] tile, kStd.
__device__ __forceinline__ void frag_a(uint32_t* a, const float* s, int r0, int k0, int ld, int g, int t) {
  const float* p = s + (r0 + g) * ld + k0 + t;
  a[0] = to_tf32(p[0]), a[1] = to_tf32(p[8 * ld]), a[2] = to_tf32(p[4]), a[3] = to_tf32(p[8 * ld + 4]);
}
// A (rows r0…r0+15, k0…k0+7) of a row-major [m][k] tile, kPair (float2 loads: conflict-free when
// ld ≡ 8 mod 32).
__device__ __forceinline__ void frag_a_pair(uint32_t* a, const float* s, int r0, int k0, int ld, int g, int t) {
  const float2 lo = *reinterpret_cast<const float2*>(s + (r0 + g) * ld + k0 + 2 * t);
  const float2 hi = *reinterpret_cast<const float2*>(s + (r0 + g + 8) * ld + k0 + 2 * t);
  a[0] = to_tf32(lo.x), a[1] = to_tf32(hi.x), a[2] = to_tf32(lo.y), a[3] = to_tf32(hi.y);
}
// A from the accumulator tile c (16 × 8, its columns the k of the next product), kPair.
__device__ __forceinline__ void frag_a_acc(uint32_t* a, const float* c) {
  a[0] = to_tf32(c[0]), a[1] = to_tf32(c[2]), a[2] = to_tf32(c[1]), a[3] = to_tf32(c[3]);
}
// B (k0…k0+7 × n0…n0+7) whose transpose is a row-major [n][k] tile, kStd.
__device__ __forceinline__ void frag_b_nk(uint32_t* b, const float* s, int n0, int k0, int ld, int g, int t) {
  const float* p = s + (n0 + g) * ld + k0 + t;
  b[0] = to_tf32(p[0]), b[1] = to_tf32(p[4]);
}
// B (k0…k0+7 × n0…n0+7) of a row-major [k][n] tile, kPair.
__device__ __forceinline__ void frag_b_kn(uint32_t* b, const float* s, int k0, int n0, int ld, int g, int t) {
  const float* p = s + (k0 + 2 * t) * ld + n0 + g;
  b[0] = to_tf32(p[0]), b[1] = to_tf32(p[ld]);
}

// Tile shapes: 4 warps; 64 queries × 64 keys per tile; q/k/v/dO rows padded to D + 4 floats.
template <int D>
struct Tf32Shape {
  static_assert(D % 8 == 0, "TF32 flash head dims are multiples of 8");
  static constexpr int kLd = D + 4;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 64;  // queries per tile (forward: 16 per warp)
  static constexpr int kCols = 64;  // keys per tile (backward: 16 per warp)
  static constexpr int kLdS = kCols + 8;  // the backward's dS tile [kRows][kLdS] (≡ 8 mod 32)
};

// Copies rows [r0, r0 + rows) of a [len, D] f32 matrix whose rows lie `stride` floats apart into
// a [rows][ld] tile with cp.async (zero past len); lands after cp_async_commit, cp_async_wait_all
// and __syncthreads. Rows in global memory start at 16-byte boundaries (D % 4 == 0, the host
// checks the base pointers).
template <int D>
__device__ __forceinline__ void load_rows_f32(float* tile, int ld, const float* src, int64_t r0, int rows, int64_t len,
                                              int64_t stride, int tid, int threads) {
  constexpr int kChunks = D / 4;
  for (int idx = tid; idx < rows * kChunks; idx += threads) {
    const int r = idx / kChunks, c = (idx % kChunks) * 4;
    const bool in = r0 + r < len;
    cp_async16(tile + r * ld + c, in ? src + (r0 + r) * stride + c : src, in);
  }
}

// The additive f32 mask entry (query qi, key kj) of problem row n, in the log2 domain.
__device__ __forceinline__ float mask_log2_f32(const FlashParams& p, const float* mask, int64_t n, int64_t qi,
                                               int64_t kj) {
  const int64_t b = p.mask_batches == 1 ? 0 : n / p.heads;
  const int64_t r = p.mask_rows == 1 ? 0 : qi;
  return mask[(b * p.mask_rows + r) * p.k_len + kj] * kLog2e;
}

}  // namespace
}  // namespace loom::cuda
