// The per-device compute stream (declared in cuda_common.h).
#include <atomic>
#include <mutex>

#include "tensor/cuda/cuda_common.h"

namespace loom::cuda {

namespace {
constexpr int kMaxDevices = 64;
std::atomic<cudaStream_t> g_streams[kMaxDevices];
std::mutex g_create_mu;
}  // namespace

cudaStream_t compute_stream() {
  int device = 0;
  LOOM_CUDA_CHECK(cudaGetDevice(&device));
  LOOM_CHECK(device >= 0 && device < kMaxDevices, "cuda: device index ", device, " beyond ", kMaxDevices);
  cudaStream_t s = g_streams[device].load(std::memory_order_acquire);
  if (s) return s;
  std::lock_guard<std::mutex> lock(g_create_mu);
  s = g_streams[device].load(std::memory_order_relaxed);
  if (!s) {
    // A blocking stream (not cudaStreamNonBlocking): the synchronous host <-> device copies on
    // the legacy stream stay ordered with everything queued here. Never destroyed (tensors may
    // be freed during static destruction).
    LOOM_CUDA_CHECK(cudaStreamCreate(&s));
    g_streams[device].store(s, std::memory_order_release);
  }
  return s;
}

}  // namespace loom::cuda
