// The per-device caching allocator (see cuda_allocator.h for the contract).
//
// State: one Pool per device index, all behind one mutex. A pool holds
//   free_blocks: rounded size -> pointer (std::multimap, so equal sizes coexist)
//   live_blocks: pointer -> block size and owner (0: the device's pool; else a graph pool's id)
//   graph_pools: id -> the private pool of one CUDA graph (its free blocks, the bytes it owns)
//   routed:      the graph pool that allocations and frees go to now (0: none)
// The allocator object is created on first use and never destroyed: tensors
// freed during static destruction may still return blocks after main() ends,
// when the CUDA runtime may already be shutting down.
#include <map>
#include <algorithm>
#include <mutex>
#include <unordered_map>

#include "tensor/cuda/cuda_allocator.h"
#include "tensor/cuda/cuda_common.h"

namespace loom {
namespace cuda {
namespace {

constexpr size_t kRound = 512;
// A cached block serves a request when it is at most 5/4 of the rounded size (2× before: a bf16
// copy of an f32 tensor then took the f32 block, and a bf16 SD 1.5 UNet held 2.5 GB for 1.7 GB of
// weights on the H200).
constexpr size_t kWasteNum = 5, kWasteDen = 4;

size_t round_up(size_t nbytes) { return (nbytes + kRound - 1) / kRound * kRound; }

struct Block {
  size_t size = 0;
  uint64_t owner = 0;  // 0: the device's pool; else the id of a graph pool
};

struct GraphPool {
  std::multimap<size_t, void*> free_blocks;
  size_t bytes = 0;  // bytes of the blocks it owns, in use or free
};

struct Pool {
  std::multimap<size_t, void*> free_blocks;
  std::unordered_map<void*, Block> live_blocks;
  std::map<uint64_t, GraphPool> graph_pools;
  uint64_t routed = 0;
  CudaAllocatorStats stats;
};

// Takes from `free_blocks` the smallest block that serves `size` (at most 5/4 of it).
bool take_cached(std::multimap<size_t, void*>& free_blocks, size_t size, void** ptr, size_t* block) {
  auto it = free_blocks.lower_bound(size);
  if (it == free_blocks.end() || it->first * kWasteDen > kWasteNum * size) return false;
  *block = it->first, *ptr = it->second;
  free_blocks.erase(it);
  return true;
}

class CachingAllocator {
 public:
  void* allocate(size_t nbytes, int device) {
    if (nbytes == 0) return nullptr;
    LOOM_CHECK(device >= 0, "cuda allocate: invalid device index ", device);
    const size_t size = round_up(nbytes);
    std::lock_guard<std::mutex> lock(mu_);
    Pool& pool = pools_[device];
    ++pool.stats.allocations;

    void* ptr = nullptr;
    size_t block = 0;
    if (pool.routed) {  // a graph's private pool: its own free blocks, then the device's
      GraphPool& graph = pool.graph_pools.at(pool.routed);
      const bool own = take_cached(graph.free_blocks, size, &ptr, &block);
      if (own || take_cached(pool.free_blocks, size, &ptr, &block)) {
        if (!own) graph.bytes += block;  // the device's cached block now belongs to the graph
        reuse(pool, ptr, block, pool.routed);
        return ptr;
      }
    } else if (take_cached(pool.free_blocks, size, &ptr, &block)) {
      reuse(pool, ptr, block, 0);
      return ptr;
    }

    DeviceGuard guard(device);
    cudaError_t err = cudaMalloc(&ptr, size);
    if (err == cudaErrorMemoryAllocation && !pool.routed) {
      // Out of memory: give the cached blocks back to the driver and retry once (not while a
      // graph is captured: cudaFree would end the capture).
      (void)cudaGetLastError();
      release_cached(pool);
      err = cudaMalloc(&ptr, size);
    }
    if (err == cudaErrorMemoryAllocation) {
      (void)cudaGetLastError();
      LOOM_FAIL("cuda allocate: out of memory allocating ", nbytes, " bytes on cuda:", device, " (",
                pool.stats.bytes_in_use, " bytes in use by loom in ", pool.stats.blocks_in_use, " blocks; ",
                pool.routed ? "while capturing a CUDA graph, cache not released)" : "cache already released)");
    }
    if (err != cudaSuccess) throw_cuda_error("cudaMalloc(&ptr, size)", err, __FILE__, __LINE__, __func__);
    ++pool.stats.cuda_malloc_calls;
    if (pool.routed) pool.graph_pools.at(pool.routed).bytes += size;
    track_live(pool, ptr, size, pool.routed);
    return ptr;
  }

  void deallocate(void* ptr, int device) {
    if (ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    Pool& pool = pools_[device];
    auto it = pool.live_blocks.find(ptr);
    LOOM_CHECK(it != pool.live_blocks.end(), "cuda deallocate: pointer ", ptr,
               " was not allocated by loom's CUDA allocator on cuda:", device, " (double free?)");
    const Block b = it->second;
    pool.live_blocks.erase(it);
    pool.stats.bytes_in_use -= b.size;
    --pool.stats.blocks_in_use;
    pool.stats.bytes_cached += b.size;
    ++pool.stats.blocks_cached;
    // A block of a graph that still exists stays with it (its replays write there). Any other
    // block freed while a graph is captured joins that graph's pool: the captured kernels may
    // have used it before the free, so nothing else may reuse it while the graph exists.
    uint64_t owner = pool.graph_pools.count(b.owner) ? b.owner : 0;
    if (owner == 0 && pool.routed) {
      owner = pool.routed;
      pool.graph_pools.at(owner).bytes += b.size;
    }
    if (owner) pool.graph_pools.at(owner).free_blocks.emplace(b.size, ptr);
    else pool.free_blocks.emplace(b.size, ptr);
  }

  uint64_t create_graph_pool(int device) {
    LOOM_CHECK(device >= 0, "cuda graph pool: invalid device index ", device);
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t id = ++next_graph_pool_;
    pools_[device].graph_pools[id];
    return id;
  }

  void begin_routing(int device, uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    Pool& pool = pools_[device];
    LOOM_CHECK(pool.graph_pools.count(id), "cuda graph pool: no pool ", id, " on cuda:", device);
    LOOM_CHECK(pool.routed == 0 || pool.routed == id, "cuda graph pool: cuda:", device,
               " already allocates from the pool of another graph being captured (pool ", pool.routed, ")");
    pool.routed = id;
  }

  void end_routing(int device) {
    std::lock_guard<std::mutex> lock(mu_);
    pools_[device].routed = 0;
  }

  bool routing(int device) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pools_.find(device);
    return it != pools_.end() && it->second.routed != 0;
  }

  void release_graph_pool(int device, uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    Pool& pool = pools_[device];
    auto it = pool.graph_pools.find(id);
    if (it == pool.graph_pools.end()) return;
    if (pool.routed == id) pool.routed = 0;
    // Free blocks go to the device's cache now; blocks in use when they are freed (their owner
    // is then unknown to graph_pools, see deallocate).
    for (const auto& [size, ptr] : it->second.free_blocks) pool.free_blocks.emplace(size, ptr);
    pool.graph_pools.erase(it);
  }

  CudaAllocatorStats stats(int device) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pools_.find(device);
    if (it == pools_.end()) return CudaAllocatorStats{};
    CudaAllocatorStats s = it->second.stats;
    s.graph_pools = it->second.graph_pools.size();
    for (const auto& [id, graph] : it->second.graph_pools) s.bytes_in_graph_pools += graph.bytes;
    return s;
  }

  void reset_peak(int device) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = pools_.find(device);
    if (it != pools_.end()) it->second.stats.peak_bytes_in_use = it->second.stats.bytes_in_use;
  }

  void empty_cache() {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [device, pool] : pools_) {
      if (pool.free_blocks.empty() || pool.routed) continue;  // no cudaFree during a capture
      DeviceGuard guard(device);
      release_cached(pool);
    }
  }

 private:
  // A cached block handed out again.
  static void reuse(Pool& pool, void* ptr, size_t block, uint64_t owner) {
    pool.stats.bytes_cached -= block;
    --pool.stats.blocks_cached;
    ++pool.stats.cache_hits;
    track_live(pool, ptr, block, owner);
  }

  static void track_live(Pool& pool, void* ptr, size_t block, uint64_t owner) {
    pool.live_blocks.emplace(ptr, Block{block, owner});
    pool.stats.bytes_in_use += block;
    ++pool.stats.blocks_in_use;
    pool.stats.peak_bytes_in_use = std::max(pool.stats.peak_bytes_in_use, pool.stats.bytes_in_use);
  }

  // cudaFree of every cached block of the device's own list (caller holds mu_ and has the
  // device current). cudaFree synchronizes the device, so pending kernels using the blocks
  // finish first. Blocks of graph pools are not touched.
  static void release_cached(Pool& pool) {
    while (!pool.free_blocks.empty()) {
      auto it = pool.free_blocks.begin();
      const size_t block = it->first;
      void* ptr = it->second;
      pool.free_blocks.erase(it);
      pool.stats.bytes_cached -= block;
      --pool.stats.blocks_cached;
      ++pool.stats.cuda_free_calls;
      LOOM_CUDA_CHECK(cudaFree(ptr));
    }
  }

  std::mutex mu_;
  std::map<int, Pool> pools_;
  uint64_t next_graph_pool_ = 0;
};

CachingAllocator& allocator() {
  static CachingAllocator* instance = new CachingAllocator();  // never destroyed, see above
  return *instance;
}

}  // namespace

void* cached_malloc(size_t nbytes, int device_index) { return allocator().allocate(nbytes, device_index); }

void cached_free(void* ptr, size_t nbytes, int device_index) {
  (void)nbytes;  // the pool knows each block's size
  allocator().deallocate(ptr, device_index);
}

uint64_t create_graph_pool(int device_index) { return allocator().create_graph_pool(device_index); }
void begin_graph_pool_allocation(int device_index, uint64_t id) { allocator().begin_routing(device_index, id); }
void end_graph_pool_allocation(int device_index) { allocator().end_routing(device_index); }
void release_graph_pool(int device_index, uint64_t id) { allocator().release_graph_pool(device_index, id); }
bool graph_pool_active(int device_index) { return allocator().routing(device_index); }

}  // namespace cuda

CudaAllocatorStats cuda_allocator_stats(int device_index) { return cuda::allocator().stats(device_index); }

void cuda_reset_peak_stats(int device_index) { cuda::allocator().reset_peak(device_index); }

void cuda_empty_cache() { cuda::allocator().empty_cache(); }

}  // namespace loom
