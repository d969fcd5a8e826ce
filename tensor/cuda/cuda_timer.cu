// CUDA events behind loom::DeviceTimer (tensor/device_timer.h).
#include "tensor/cuda/cuda_backend.h"
#include "tensor/cuda/cuda_common.h"

namespace loom {

namespace {
struct EventPair {
  int device = 0;
  cudaEvent_t events[2] = {nullptr, nullptr};
};
}  // namespace

void* cuda_timer_create(int device) {
  cuda::DeviceGuard guard(device);
  auto* t = new EventPair;
  t->device = device;
  LOOM_CUDA_CHECK(cudaEventCreate(&t->events[0]));
  LOOM_CUDA_CHECK(cudaEventCreate(&t->events[1]));
  return t;
}

void cuda_timer_record(void* timer, int which) {
  auto* t = static_cast<EventPair*>(timer);
  cuda::DeviceGuard guard(t->device);
  LOOM_CUDA_CHECK(cudaEventRecord(t->events[which], cuda::compute_stream()));
}

double cuda_timer_elapsed_ms(void* timer) {
  auto* t = static_cast<EventPair*>(timer);
  cuda::DeviceGuard guard(t->device);
  LOOM_CUDA_CHECK(cudaEventSynchronize(t->events[1]));
  float ms = 0.f;
  LOOM_CUDA_CHECK(cudaEventElapsedTime(&ms, t->events[0], t->events[1]));
  return ms;
}

void cuda_timer_destroy(void* timer) {
  auto* t = static_cast<EventPair*>(timer);
  cudaEventDestroy(t->events[0]);
  cudaEventDestroy(t->events[1]);
  delete t;
}

}  // namespace loom
