// Built instead of the CUDA backend when no nvcc was found (or LOOM_CUDA=OFF):
// no CUDA backend, no devices, and an allocator that was never used.
#include "tensor/cuda/cuda_allocator.h"
#include "tensor/cuda/cuda_backend.h"

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
bool cuda_thin_gemm_fits(const GemmBatch&) { return false; }
}  // namespace loom
