// Built instead of the CUDA backend when no nvcc was found (or LOOM_CUDA=OFF):
// no CUDA backend, no devices, and an allocator that was never used.
#include "tensor/cuda/cuda_allocator.h"
#include "tensor/cuda/cuda_backend.h"
#include "tensor/cuda/cuda_graph.h"
#include "tensor/error.h"

namespace loom {
Backend* cuda_backend() { return nullptr; }
int cuda_runtime_device_count() { return 0; }
CudaAllocatorStats cuda_allocator_stats(int) { return {}; }
void cuda_empty_cache() {}
void cuda_reset_peak_stats(int) {}
void* cuda_timer_create(int) { return nullptr; }
void cuda_timer_record(void*, int) {}
double cuda_timer_elapsed_ms(void*) { return 0.0; }
void cuda_timer_destroy(void*) {}
void cuda_profile_print_section(const char*) {}
bool cuda_thin_gemm_fits(const GemmBatch&) { return false; }
void set_cuda_thin_gemm(bool) {}
bool cuda_gemm_wgmma(const GemmBatch&) { return false; }
}  // namespace loom

namespace loom::cuda {
void* cached_malloc(size_t nbytes, int) {
  if (nbytes == 0) return nullptr;
  LOOM_FAIL("cuda allocator: loom was built without CUDA");
}
void cached_free(void* ptr, size_t, int) {
  if (ptr != nullptr) LOOM_FAIL("cuda allocator: loom was built without CUDA (a pointer it never handed out)");
}
uint64_t create_graph_pool(int) { LOOM_FAIL("cuda graph pool: loom was built without CUDA"); }
void begin_graph_pool_allocation(int, uint64_t) { LOOM_FAIL("cuda graph pool: loom was built without CUDA"); }
void end_graph_pool_allocation(int) {}
void release_graph_pool(int, uint64_t) {}
bool graph_pool_active(int) { return false; }
Graph* graph_create(int) { LOOM_FAIL("cuda graph: loom was built without CUDA"); }
void graph_begin_capture(Graph*) { LOOM_FAIL("cuda graph: loom was built without CUDA"); }
void graph_end_capture(Graph*) { LOOM_FAIL("cuda graph: loom was built without CUDA"); }
void graph_abort_capture(Graph*) noexcept {}
void graph_replay(Graph*) { LOOM_FAIL("cuda graph: loom was built without CUDA"); }
void graph_destroy(Graph*) noexcept {}
PinnedStaging* pinned_staging_create(int) { LOOM_FAIL("cuda pinned copy: loom was built without CUDA"); }
void pinned_copy_to_device(PinnedStaging*, void*, const void*, size_t) {
  LOOM_FAIL("cuda pinned copy: loom was built without CUDA");
}
void pinned_staging_destroy(PinnedStaging*) noexcept {}
void set_kernel_profile_paused(bool) noexcept {}
}  // namespace loom::cuda
