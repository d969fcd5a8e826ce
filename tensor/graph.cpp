#include "tensor/graph.h"

#include "tensor/backend.h"
#include "tensor/cuda/cuda_graph.h"

namespace loom {

bool device_graphs_supported(Device device) {
  return device.is_cuda() && cuda_backend_built() && device.index >= 0 && device.index < cuda_device_count();
}

DeviceGraph::DeviceGraph(Device device) : device_(device) {
  LOOM_CHECK(device_graphs_supported(device), "device graphs: not supported on device ", device,
             " (CUDA graphs need a CUDA device and a build with CUDA)");
  graph_ = cuda::graph_create(device.index);
}

DeviceGraph::~DeviceGraph() { cuda::graph_destroy(graph_); }

void DeviceGraph::capture(const std::function<void()>& work) {
  LOOM_CHECK(!captured_, "device graphs: capture() called twice on one graph");
  cuda::graph_begin_capture(graph_);
  try {
    work();
  } catch (...) {
    cuda::graph_abort_capture(graph_);
    throw;
  }
  cuda::graph_end_capture(graph_);
  captured_ = true;
}

void DeviceGraph::replay() {
  LOOM_CHECK(captured_, "device graphs: replay() before a successful capture()");
  cuda::graph_replay(graph_);
}

PinnedUpload::~PinnedUpload() { cuda::pinned_staging_destroy(staging_); }

void PinnedUpload::copy(const Tensor& dst, const Tensor& src) {
  LOOM_CHECK(dst.defined() && src.defined(), "pinned upload: undefined tensor");
  LOOM_CHECK(src.device().is_cpu(), "pinned upload: the source must be on the CPU, got ", src.device());
  LOOM_CHECK(dst.shape() == src.shape(), "pinned upload: destination ", dst.shape(), " and source ", src.shape(),
             " differ in shape");
  if (!dst.device().is_cuda()) {
    dst.copy_(src);
    return;
  }
  LOOM_CHECK(dst.is_contiguous(), "pinned upload: the destination must be contiguous");
  if (staging_ == nullptr || device_ != dst.device().index) {
    cuda::pinned_staging_destroy(staging_);
    staging_ = nullptr;
    staging_ = cuda::pinned_staging_create(dst.device().index);
    device_ = dst.device().index;
  }
  const Tensor host = src.to(dst.dtype()).contiguous();
  cuda::pinned_copy_to_device(staging_, dst.raw_data(), host.raw_data(), size_t(host.numel()) * itemsize(host.dtype()));
}

}  // namespace loom
