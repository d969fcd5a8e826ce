// Times the device work issued between start() and stop(): CUDA events on a CUDA device
// (no host synchronisation until elapsed_ms()), the host clock on the CPU. For benchmarks
// and the trainer's phase timings, never for tests.
#pragma once

#include <chrono>

#include "tensor/device.h"

namespace loom {

class DeviceTimer {
 public:
  explicit DeviceTimer(Device device);
  ~DeviceTimer();
  DeviceTimer(const DeviceTimer&) = delete;
  DeviceTimer& operator=(const DeviceTimer&) = delete;
  void start();
  void stop();
  double elapsed_ms();  // waits for the stop mark

 private:
  Device device_;
  void* events_ = nullptr;
  std::chrono::steady_clock::time_point t0_, t1_;
};

// Bytes of device memory loom holds for tensors right now and at most since the last reset
// (the CUDA caching allocator's statistics; 0 on the CPU).
struct DeviceMemory {
  size_t in_use = 0, peak = 0, cached = 0;
};
DeviceMemory device_memory(Device device);
void reset_peak_device_memory(Device device);

// With LOOM_CUDA_PROFILE=1 on a CUDA build: prints the table of the kernels launched since the
// previous section (or the start) under `title` to stderr and starts a new section, so that a
// benchmark can report each phase on its own. A no-op otherwise.
void print_device_profile_section(const char* title);

}  // namespace loom
