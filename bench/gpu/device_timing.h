// Shared by the GPU benchmarks: the median time of `reps` calls of f() on `device`, after 5
// warm-up calls, each call timed with DeviceTimer (CUDA events on a GPU).
#pragma once

#include <algorithm>
#include <vector>

#include "tensor/device_timer.h"

namespace loom::bench {

template <typename F>
double median_ms(Device device, int reps, F&& f) {
  for (int i = 0; i < 5; ++i) f();
  std::vector<double> ms;
  DeviceTimer timer(device);
  for (int i = 0; i < reps; ++i) {
    timer.start();
    f();
    timer.stop();
    ms.push_back(timer.elapsed_ms());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace loom::bench
