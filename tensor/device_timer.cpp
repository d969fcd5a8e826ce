#include "tensor/device_timer.h"

#include "tensor/cuda/cuda_allocator.h"
#include "tensor/cuda/cuda_backend.h"

namespace loom {

DeviceTimer::DeviceTimer(Device device) : device_(device) {
  if (device.is_cuda()) events_ = cuda_timer_create(device.index);
}
DeviceTimer::~DeviceTimer() {
  if (events_) cuda_timer_destroy(events_);
}
void DeviceTimer::start() {
  if (events_) cuda_timer_record(events_, 0);
  else t0_ = std::chrono::steady_clock::now();
}
void DeviceTimer::stop() {
  if (events_) cuda_timer_record(events_, 1);
  else t1_ = std::chrono::steady_clock::now();
}
double DeviceTimer::elapsed_ms() {
  if (events_) return cuda_timer_elapsed_ms(events_);
  return std::chrono::duration<double, std::milli>(t1_ - t0_).count();
}

DeviceMemory device_memory(Device device) {
  if (!device.is_cuda()) return {};
  const CudaAllocatorStats s = cuda_allocator_stats(device.index);
  return {s.bytes_in_use, s.peak_bytes_in_use, s.bytes_cached};
}
void reset_peak_device_memory(Device device) {
  if (device.is_cuda()) cuda_reset_peak_stats(device.index);
}
void print_device_profile_section(const char* title) { cuda_profile_print_section(title); }

}  // namespace loom
