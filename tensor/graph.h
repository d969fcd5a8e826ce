// Captured device work (CUDA graphs) and asynchronous host-to-device copies, behind a
// device-neutral face: the trainer and the benchmarks use them without CUDA headers. On the CPU
// (and in builds without CUDA) there are no graphs: device_graphs_supported() is false and the
// callers run eagerly; PinnedUpload is then a plain copy.
#pragma once

#include <functional>

#include "tensor/tensor.h"

namespace loom {

namespace cuda {
struct Graph;
struct PinnedStaging;
}  // namespace cuda

// Whether work on `device` can be captured as a graph (a CUDA device in a build with CUDA).
bool device_graphs_supported(Device device);

// One captured graph of `device`'s compute stream.
//
// capture(work) runs `work` once on the host while the device records, without executing, the
// kernels and copies it queues; replay() then queues all of them again in one launch, with the
// same arguments and the same memory. So `work` must do device work only: no host read of a
// device value, no synchronous copy, no argument that changes from one replay to the next
// (read changing inputs from tensors that stay alive and are refilled before each replay).
// Memory allocated during the capture comes from the graph's private pool and stays reserved
// until the graph is destroyed; tensors that `work` leaves alive (outputs) keep pointing there
// and are rewritten by every replay. If the capture fails (a host synchronisation inside),
// capture() throws loom::Error naming the CUDA error; the graph is then empty, and the device
// and the allocator are as usable as before (what `work` had queued was not executed).
class DeviceGraph {
 public:
  explicit DeviceGraph(Device device);  // throws when !device_graphs_supported(device)
  ~DeviceGraph();
  DeviceGraph(const DeviceGraph&) = delete;
  DeviceGraph& operator=(const DeviceGraph&) = delete;

  void capture(const std::function<void()>& work);  // once per graph
  void replay();                                     // asynchronous; throws before capture()
  bool captured() const { return captured_; }
  Device device() const { return device_; }

 private:
  Device device_;
  cuda::Graph* graph_ = nullptr;
  bool captured_ = false;
};

// Copies host tensors into device tensors. On CUDA through a pinned host buffer of its own,
// asynchronously on the device's compute stream (the next copy through the same PinnedUpload
// waits until the previous one has left the buffer); elsewhere a plain copy_.
class PinnedUpload {
 public:
  PinnedUpload() = default;
  ~PinnedUpload();
  PinnedUpload(const PinnedUpload&) = delete;
  PinnedUpload& operator=(const PinnedUpload&) = delete;

  // dst: contiguous; src: on the CPU, dst's shape (its dtype is converted to dst's on the host).
  void copy(const Tensor& dst, const Tensor& src);

 private:
  cuda::PinnedStaging* staging_ = nullptr;
  int device_ = -1;
};

}  // namespace loom
