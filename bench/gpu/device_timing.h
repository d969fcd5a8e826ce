// Shared by the GPU benchmarks: the median time of `reps` calls of f() on `device`, after 5
// warm-up calls, each call timed with DeviceTimer (CUDA events on a GPU); and the same for work
// captured once as a CUDA graph and replayed (tensor/graph.h).
#pragma once

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "tensor/device_timer.h"
#include "tensor/graph.h"

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

// A graph's timing: ms < 0 when the capture failed (then `failure` says why).
struct GraphTiming {
  double ms = -1;
  std::string failure;
};

// Runs captured() then after() eagerly 3 times (warm-up), captures captured() once as a graph,
// and returns the median of `reps` (replay, after()) pairs, after 5 warm-up pairs. after() is
// the eager part (an optimizer step); captured() must do device work only (tensor/graph.h).
template <typename Captured, typename After>
GraphTiming graph_median_ms(Device device, int reps, Captured&& captured, After&& after) {
  for (int i = 0; i < 3; ++i) captured(), after();
  GraphTiming t;
  if (!device_graphs_supported(device)) {
    t.failure = "no graphs on " + device.str();
    return t;
  }
  DeviceGraph graph(device);
  try {
    graph.capture([&] { captured(); });
  } catch (const Error& e) {
    const std::string what = e.what();
    t.failure = what.substr(0, what.find('\n'));
    return t;
  }
  t.ms = median_ms(device, reps, [&] {
    graph.replay();
    after();
  });
  return t;
}

// `ms` as JSON: the number, or null.
inline std::string json_ms(double ms) {
  if (ms < 0) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", ms);
  return buf;
}

// `s` as a JSON string (quotes and backslashes escaped, control characters dropped).
inline std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += c;
    else if (static_cast<unsigned char>(c) >= 0x20) out += c;
  }
  return out + "\"";
}

}  // namespace loom::bench
