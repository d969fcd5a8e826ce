// CUDA graph capture and replay on the compute stream, and pinned host staging (see
// cuda_graph.h for the contract).
#include <cstring>

#include "tensor/cuda/cuda_allocator.h"
#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_graph.h"

namespace loom::cuda {

struct Graph {
  int device = 0;
  uint64_t pool = 0;  // the caching allocator's private pool of this graph
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  bool capturing = false;
};

Graph* graph_create(int device) {
  auto* g = new Graph;
  g->device = device;
  try {
    g->pool = create_graph_pool(device);
  } catch (...) {
    delete g;
    throw;
  }
  return g;
}

void graph_begin_capture(Graph* g) {
  LOOM_CHECK(g != nullptr, "cuda graph: null graph");
  LOOM_CHECK(!g->capturing && g->exec == nullptr, "cuda graph: begin_capture on a graph captured already");
  DeviceGuard guard(g->device);
  const cudaStream_t stream = compute_stream();
  begin_graph_pool_allocation(g->device, g->pool);
  set_kernel_profile_paused(true);
  const cudaError_t err = cudaStreamBeginCapture(stream, cudaStreamCaptureModeRelaxed);
  if (err != cudaSuccess) {
    end_graph_pool_allocation(g->device);
    set_kernel_profile_paused(false);
    throw_cuda_error("cudaStreamBeginCapture(compute_stream(), cudaStreamCaptureModeRelaxed)", err, __FILE__,
                     __LINE__, __func__);
  }
  g->capturing = true;
}

void graph_end_capture(Graph* g) {
  LOOM_CHECK(g != nullptr && g->capturing, "cuda graph: end_capture without begin_capture");
  DeviceGuard guard(g->device);
  cudaGraph_t graph = nullptr;
  const cudaError_t err = cudaStreamEndCapture(compute_stream(), &graph);
  g->capturing = false;
  end_graph_pool_allocation(g->device);
  set_kernel_profile_paused(false);
  if (err != cudaSuccess) {
    if (graph) (void)cudaGraphDestroy(graph);
    throw_cuda_error("cudaStreamEndCapture (the captured work synchronised with the host or made a call that a "
                     "graph cannot hold)",
                     err, __FILE__, __LINE__, __func__);
  }
  LOOM_CHECK(graph != nullptr, "cuda graph: cudaStreamEndCapture returned no graph");
  g->graph = graph;
  LOOM_CUDA_CHECK(cudaGraphInstantiate(&g->exec, g->graph, 0));
}

void graph_abort_capture(Graph* g) noexcept {
  if (g == nullptr || !g->capturing) return;
  int previous = 0;
  const bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
  if (cudaSetDevice(g->device) == cudaSuccess) {
    cudaStream_t stream = nullptr;
    try {
      stream = compute_stream();
    } catch (...) {
    }
    cudaGraph_t graph = nullptr;
    if (stream && cudaStreamEndCapture(stream, &graph) == cudaSuccess && graph) (void)cudaGraphDestroy(graph);
  }
  (void)cudaGetLastError();  // the capture's error is not sticky: clear it for the next check
  if (have_previous) (void)cudaSetDevice(previous);
  g->capturing = false;
  try {
    end_graph_pool_allocation(g->device);
  } catch (...) {
  }
  set_kernel_profile_paused(false);
}

void graph_replay(Graph* g) {
  LOOM_CHECK(g != nullptr && g->exec != nullptr, "cuda graph: replay of a graph that was not captured");
  DeviceGuard guard(g->device);
  LOOM_CUDA_CHECK(cudaGraphLaunch(g->exec, compute_stream()));
}

void graph_destroy(Graph* g) noexcept {
  if (g == nullptr) return;
  graph_abort_capture(g);
  // An executable graph still running is freed when it completes (cudaGraphExecDestroy); its
  // pool's blocks go back to the device's cache, reused only by work queued after the replays
  // on the same compute stream.
  if (g->exec) (void)cudaGraphExecDestroy(g->exec);
  if (g->graph) (void)cudaGraphDestroy(g->graph);
  (void)cudaGetLastError();
  try {
    release_graph_pool(g->device, g->pool);
  } catch (...) {
  }
  delete g;
}

// ---- pinned staging ------------------------------------------------------------------------------

struct PinnedStaging {
  int device = 0;
  void* host = nullptr;
  size_t capacity = 0;
  cudaEvent_t done = nullptr;  // recorded after the last copy out of `host`
  bool pending = false;
};

PinnedStaging* pinned_staging_create(int device) {
  auto* s = new PinnedStaging;
  s->device = device;
  return s;
}

void pinned_copy_to_device(PinnedStaging* s, void* dst, const void* src, size_t nbytes) {
  LOOM_CHECK(s != nullptr, "cuda pinned copy: null staging buffer");
  if (nbytes == 0) return;
  DeviceGuard guard(s->device);
  if (s->pending) {  // the previous copy out of the buffer must be done before it is overwritten
    LOOM_CUDA_CHECK(cudaEventSynchronize(s->done));
    s->pending = false;
  }
  if (s->capacity < nbytes) {
    if (s->host) LOOM_CUDA_CHECK(cudaFreeHost(s->host));
    s->host = nullptr, s->capacity = 0;
    LOOM_CUDA_CHECK(cudaHostAlloc(&s->host, nbytes, cudaHostAllocDefault));
    s->capacity = nbytes;
  }
  if (s->done == nullptr) LOOM_CUDA_CHECK(cudaEventCreateWithFlags(&s->done, cudaEventDisableTiming));
  std::memcpy(s->host, src, nbytes);
  const cudaStream_t stream = compute_stream();
  LOOM_CUDA_CHECK(cudaMemcpyAsync(dst, s->host, nbytes, cudaMemcpyHostToDevice, stream));
  LOOM_CUDA_CHECK(cudaEventRecord(s->done, stream));
  s->pending = true;
}

void pinned_staging_destroy(PinnedStaging* s) noexcept {
  if (s == nullptr) return;
  int previous = 0;
  const bool have_previous = cudaGetDevice(&previous) == cudaSuccess;
  if (cudaSetDevice(s->device) == cudaSuccess) {
    if (s->pending) (void)cudaEventSynchronize(s->done);
    if (s->done) (void)cudaEventDestroy(s->done);
    if (s->host) (void)cudaFreeHost(s->host);
  }
  (void)cudaGetLastError();
  if (have_previous) (void)cudaSetDevice(previous);
  delete s;
}

}  // namespace loom::cuda
