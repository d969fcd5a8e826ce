// CUDA graphs and pinned host staging, as plain C++ entry points (no CUDA headers) for
// tensor/graph.cpp; built from cuda_graph.cu, or cuda_stub.cpp without CUDA (where every
// function throws, except the destroy functions, which accept nullptr).
//
// A Graph records the work queued on its device's compute stream between begin_capture and
// end_capture (cudaStreamCaptureModeRelaxed, so that the caching allocator may cudaMalloc),
// with every allocation routed to a private pool of the caching allocator (cuda_allocator.h)
// and LOOM_CUDA_PROFILE's per-launch events paused. A host synchronisation during the capture
// (a synchronous copy, a read of a device value) invalidates it: end_capture then throws
// naming the CUDA error, and the graph can be destroyed (nothing was replayed).
#pragma once

#include <cstddef>

namespace loom::cuda {

struct Graph;
Graph* graph_create(int device);
void graph_begin_capture(Graph* g);
void graph_end_capture(Graph* g);            // instantiates; throws loom::Error on failure
void graph_abort_capture(Graph* g) noexcept; // ends a capture that failed on the way (no throw)
void graph_replay(Graph* g);                 // one launch on the compute stream (asynchronous)
void graph_destroy(Graph* g) noexcept;       // also releases the private pool (nullptr: nothing)

// A pinned host buffer that copies host bytes to the device asynchronously on the compute
// stream. The next copy through the same buffer first waits for the previous one to finish
// (it is long done in a training loop: queued before the previous step's work).
struct PinnedStaging;
PinnedStaging* pinned_staging_create(int device);
void pinned_copy_to_device(PinnedStaging* s, void* dst, const void* src, size_t nbytes);
void pinned_staging_destroy(PinnedStaging* s) noexcept;

// Pauses LOOM_CUDA_PROFILE's per-launch events (cuda_profile.cu; kernel_profile_enabled() is
// false while paused): during a capture they would become graph nodes and time nothing.
void set_kernel_profile_paused(bool paused) noexcept;

}  // namespace loom::cuda
