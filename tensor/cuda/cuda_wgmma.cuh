// Internal to tensor/cuda/ (sm_90a only: compiled into the loom_tensor_sm90a object library):
// Hopper's warpgroup matrix multiply-accumulate (wgmma.mma_async) for bf16 / f16 with f32
// accumulators, its shared-memory matrix descriptors in the 128-byte swizzle, and its fences.
//
// A warpgroup is 4 consecutive warps (128 threads, the first warp index divisible by 4). One
// wgmma m64nNk16 computes D[64×N] (+)= A[64×16]·B[16×N]; the accumulator fragment of warp w of
// the group is mma.sync's 16×8 C fragment repeated over N/8 column blocks, rows 16w…16w+15:
//   d[4j + 0], d[4j + 1]  row 16w + g,     columns 8j + 2t, 8j + 2t + 1   (g = lane/4, t = lane%4)
//   d[4j + 2], d[4j + 3]  row 16w + g + 8, same columns
// and an A operand taken from registers has mma.sync's m16k16 A fragment layout (a[0..3]), so
// an accumulator tile converted to bf16 / f16 is directly the A operand of the next product.
//
// Shared-memory tiles (the 128-byte swizzle, TMA's SWIZZLE_128B): rows of exactly 128 bytes
// (64 elements), the tile 1024-byte aligned, the 16-byte chunk c of row r stored at chunk
// c ^ (r % 8) of that row (sw128_offset, cuda_flash_tc.cuh). Such a tile of [rows][64] is
//   K-major for A / B when its rows are M / N and its 64 columns are K: the descriptor's stride
//     byte offset is 1024 (8 rows), the leading byte offset unused; the k-slice 16k…16k+15 is
//     the descriptor whose start address is 32·k bytes further;
//   MN-major for A / B (imm-trans-a / -b = 1) when its rows are K and its 64 columns are M / N:
//     stride byte offset 1024 (8 rows of K), leading byte offset the distance to the next 64
//     columns (unused when M or N ≤ 64); the k-slice 16k… starts 16·128·k bytes further, and
//     N columns 8c… start 16·c bytes further (inside the row's 128 bytes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace loom::cuda {
namespace {

// The first 1024-byte-aligned address at or after a dynamic shared-memory start (the swizzle
// pattern follows address bits; launches ask for 1024 bytes of slack).
__device__ __forceinline__ unsigned char* align_1024(unsigned char* smem) {
  return smem + ((1024 - (__cvta_generic_to_shared(smem) & 1023)) & 1023);
}

// The matrix descriptor of a 128-byte-swizzled tile starting at `smem` (1024-byte aligned, or
// a k-slice offset from such a start inside the first 128 bytes of a row).
__device__ __forceinline__ uint64_t sw128_desc(const void* smem, uint32_t leading_bytes, uint32_t stride_bytes) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  uint64_t desc = uint64_t((addr & 0x3FFFF) >> 4);
  desc |= uint64_t((leading_bytes >> 4) & 0x3FFF) << 16;
  desc |= uint64_t((stride_bytes >> 4) & 0x3FFF) << 32;
  desc |= uint64_t(1) << 62;  // swizzle mode 1: 128 bytes
  return desc;
}

// Orders this thread's register writes (accumulators, A fragments) before the wgmma that follow.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed groups of this warpgroup are still running.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's shared-memory writes (st.shared, cp.async) visible to the async proxy that
// wgmma reads through; a barrier must follow before other threads' wgmma read them.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// The bulk-copy engine's reduction: global[dst…dst + bytes) += shared[src…) as f32, asynchronous
// (bytes a multiple of 16, both addresses 16-byte aligned; the writes to src must have been made
// visible to the async proxy by fence_async_shared). bulk_commit closes this thread's group;
// bulk_wait_read<N>() waits until at most N of its groups still read shared memory, bulk_wait<N>()
// until at most N are still running at all.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, const float* src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
               "r"(uint32_t(__cvta_generic_to_shared(src))), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of the accumulators across an asynchronous wgmma.
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The products, overloaded on the accumulator count (N / 2 floats per thread for m64nNk16):
//   wgmma_ss(d, desc_a, desc_b, scale_d, T())        d (+)= A·B, A [64×16] and B [16×N] from
//       shared memory, both K-major; N = 64, 128. d = A·B when scale_d == 0.
//   wgmma_ss<1>(d, desc_a, desc_b, scale_d, T())     the same with B N-major (N = 128 only).
//   wgmma_rs_tb(d, a, desc_b, scale_d, T())          A from registers (a[0..3]), B N-major;
//       N = 40, 64.
//   wgmma_ss_ta_tb(d, desc_a, desc_b, scale_d, T())  A M-major, B N-major; N = 16, 24, 32, 40, 64.
// Operand numbering: %0… the accumulators, then the A operand(s), the B descriptor, scale_d.
// One macro writes the family for bf16 and for f16 (TN the PTX type name); each function is one
// wgmma.mma_async with its register list written out.
#define LOOM_WGMMA_WRAPPERS(T, TN)                                                                                     \
__device__ __forceinline__ void wgmma_ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d, T) {           \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TN "." TN " {"                                                     \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                                         \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"                                                \
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                                               \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),          \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),        \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])         \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                                       \
}                                                                                                                      \
template <int kTransB = 0>                                                                                             \
__device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d, T) {           \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TN "." TN " {"                                                    \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                                         \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"                                               \
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"                                               \
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"                                                \
      "}, %64, %65, p, 1, 1, 0, %67;\n}\n"                                                                             \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),          \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),        \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),        \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),        \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),        \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),        \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])         \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransB));                                                         \
}                                                                                                                      \
__device__ __forceinline__ void wgmma_rs_tb(float (&d)[20], const uint32_t (&a)[4], uint64_t desc_b, int scale_d, T) { \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %25, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n40k16.f32." TN "." TN " {"                                                     \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                                         \
      "%16,%17,%18,%19"                                                                                                \
      "}, {%20,%21,%22,%23}, %24, p, 1, 1, 1;\n}\n"                                                                    \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),          \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19])                                                             \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));                                        \
}                                                                                                                      \
__device__ __forceinline__ void wgmma_rs_tb(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int scale_d, T) { \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TN "." TN " {"                                                     \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                                         \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"                                                \
      "}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"                                                                    \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),          \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),        \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])         \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));                                        \
}                                                                                                                      \
__device__ __forceinline__ void wgmma_ss_ta_tb(float (&d)[8], uint64_t desc_a, uint64_t desc_b, int scale_d, T) {      \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TN "." TN " {"                                                     \
      "%0,%1,%2,%3,%4,%5,%6,%7"                                                                                        \
      "}, %8, %9, p, 1, 1, 1, 1;\n}\n"                                                                                 \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])                 \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                                       \
}                                                                                                                      \
__device__ __forceinline__ void wgmma_ss_ta_tb(float (&d)[12], uint64_t desc_a, uint64_t desc_b, int scale_d, T) {     \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %14, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n24k16.f32." TN "." TN " {"                                                     \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11"                                                                          \
      "}, %12, %13, p, 1, 1, 1, 1;\n}\n"                                                                               \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11])                                                               \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                                       \
}                                                                                                                      \
__device__ __forceinline__ void wgmma_ss_ta_tb(float (&d)[16], uint64_t desc_a, uint64_t desc_b, int scale_d, T) {     \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TN "." TN " {"                                                     \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"                                                          \
      "}, %16, %17, p, 1, 1, 1, 1;\n}\n"                                                                               \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])           \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                                       \
}                                                                                                                      \
__device__ __forceinline__ void wgmma_ss_ta_tb(float (&d)[20], uint64_t desc_a, uint64_t desc_b, int scale_d, T) {     \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %22, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n40k16.f32." TN "." TN " {"                                                     \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                                         \
      "%16,%17,%18,%19"                                                                                                \
      "}, %20, %21, p, 1, 1, 1, 1;\n}\n"                                                                               \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),          \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19])                                                             \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                                       \
}                                                                                                                      \
__device__ __forceinline__ void wgmma_ss_ta_tb(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d, T) {     \
  asm volatile(                                                                                                        \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                                     \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TN "." TN " {"                                                     \
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"                                                         \
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"                                                \
      "}, %32, %33, p, 1, 1, 1, 1;\n}\n"                                                                               \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),          \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),        \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])         \
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));                                                                       \
}
LOOM_WGMMA_WRAPPERS(__nv_bfloat16, "bf16")
LOOM_WGMMA_WRAPPERS(__half, "f16")
#undef LOOM_WGMMA_WRAPPERS

}  // namespace
}  // namespace loom::cuda
