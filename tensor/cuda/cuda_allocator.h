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
// CUDA graphs (tensor/cuda/cuda_graph.cu) get a private pool each: while a device's pool is
// routed to one (begin_graph_pool_allocation), every allocation on that device comes from the
// private pool (its free blocks first, then any cached block of the device, which moves to the
// private pool, then cudaMalloc), and every block freed meanwhile (whoever allocated it) goes to
// the private pool. Blocks of a private pool are never handed to other allocations until
// release_graph_pool: the graph's kernels may read and write them at every replay. Stream order
// makes reuse inside one capture safe. The statistics count private blocks too: in use while
// handed out, cached while free in a private pool.
//
// These functions exist only in builds with the CUDA backend.
#pragma once

#include <cstddef>
#include <cstdint>

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
  size_t graph_pools = 0;        // private pools of CUDA graphs not yet released
  size_t bytes_in_graph_pools = 0;  // bytes of blocks owned by those pools (in use or cached)
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

// A new private pool on `device_index` (an id > 0).
uint64_t create_graph_pool(int device_index);
// Routes every allocation and free on `device_index` to pool `id` until end_graph_pool_allocation.
// Throws when another pool is routed on that device already.
void begin_graph_pool_allocation(int device_index, uint64_t id);
void end_graph_pool_allocation(int device_index);
// Hands the pool's blocks back to the device's pool: free ones at once (cached), blocks still in
// use when they are freed. The caller guarantees that no work that uses them is queued after
// this call on another stream than the compute stream (stream order covers the rest).
void release_graph_pool(int device_index, uint64_t id);
// Whether allocations on `device_index` go to a private pool right now.
bool graph_pool_active(int device_index);
}  // namespace cuda

}  // namespace loom
