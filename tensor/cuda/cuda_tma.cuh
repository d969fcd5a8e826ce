// Internal to tensor/cuda/ (sm_90a: the loom_tensor_sm90a object library): Hopper's tensor memory
// accelerator (TMA: cp.async.bulk.tensor, one instruction per tile, described by a CUtensorMap made
// on the host) and the shared-memory mbarriers that say when its copies have landed and when a
// buffer may be refilled.
//
// An mbarrier counts arrivals (and, for TMA, bytes): a phase completes when `count` arrivals and
// every expected byte are in, then the barrier flips to the next phase. A thread waits for the
// phase of a given parity (0, 1, 0, …) to complete; the producer / consumer rings here never run
// more than one phase ahead of a waiter, so the parity names the phase exactly.
#pragma once

#include <cuda.h>

#include <cstdint>

namespace loom::cuda {
namespace {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Sets up `bar` for `count` arrivals a phase (one thread, before any use; then mbar_init_fence and
// a block barrier).
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(count) : "memory");
}
// Makes the initialisations visible to the other threads and to the TMA unit.
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar)) : "memory");
}
// One arrival that also announces `bytes` more bytes for this phase (the TMA copies that follow).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
}
// Spins until the phase of `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// The box of `map` at coordinates (c0, c1, c2, c3) (innermost first) into shared memory at dst
// (1024-byte aligned for the 128-byte swizzle); its bytes complete a phase of `bar`. Elements of
// the box outside the tensor are written as zeros.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(shared_address(bar))
      : "memory");
}

// The 2-D form (a row-major matrix: c0 the column, c1 the row).
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(shared_address(bar))
      : "memory");
}

// Warp-specialised kernels hand registers from the warpgroups that need few (a producer) to those
// that need many: every warp of a warpgroup executes the same one, N a multiple of 8 in 24…256.
template <int N>
__device__ __forceinline__ void set_max_registers_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void set_max_registers_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace
}  // namespace loom::cuda
