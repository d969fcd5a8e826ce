// The CUDA caching allocator: one pool per device. Plain C++ (no CUDA headers),
// so tests and tools can query the statistics.
//
// Requests are rounded up to a multiple of 512 bytes. A freed block goes to its
// device's free list (keyed by size) instead of back to the driver, and a later
// request reuses the smallest cached block that fits and is at most 5/4 of the
// rounded request. When cudaMalloc runs out of memory, the device's cache is
// released and the call retried once; if it fails again, loom::Error names the
// request, the device and the pool's statistics. Memory is plain cudaMalloc
// memory (never managed memory). All functions are thread-safe.
//
// Blocks are handed out for use on the device's compute stream (the one stream
// loom queues work on; the synchronous copies of the legacy stream are ordered
// with it), so a block freed while kernels still read it is reused only by work
// ordered after them.
//
// These functions exist only in builds with the CUDA backend.
#pragma once

#include <cstddef>

namespace loom {

struct CudaAllocatorStats {
  size_t bytes_in_use = 0;       // bytes of blocks handed out and not yet freed (block sizes)
  size_t bytes_cached = 0;       // bytes held in the free lists for reuse
  size_t blocks_in_use = 0;
  size_t blocks_cached = 0;
  size_t cuda_malloc_calls = 0;  // cumulative cudaMalloc calls (successful ones)
  size_t cuda_free_calls = 0;    // cumulative cudaFree calls
  size_t allocations = 0;        // cumulative non-empty allocation requests
  size_t cache_hits = 0;         // of which served from the free list
  size_t peak_bytes_in_use = 0;  // the largest bytes_in_use since the start or the last reset
};

// Statistics of one device's pool (all zero for a device never used).
CudaAllocatorStats cuda_allocator_stats(int device_index);
// Sets the peak of one device's pool to its current bytes in use.
void cuda_reset_peak_stats(int device_index);
// Returns every cached (free) block of every device to the driver. Blocks in use are untouched.
void cuda_empty_cache();

namespace cuda {
// The pool behind CudaBackend::allocate / deallocate. nbytes == 0 gives nullptr;
// freeing nullptr does nothing. Freeing a pointer the pool did not hand out throws.
void* cached_malloc(size_t nbytes, int device_index);
void cached_free(void* ptr, size_t nbytes, int device_index);
}  // namespace cuda

}  // namespace loom
