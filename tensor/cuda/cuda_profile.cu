// Kernel-time attribution for LOOM_CUDA_PROFILE=1 (see cuda_common.h): an event is recorded on
// the device's compute stream after every launch (check_last_launch), cuBLAS and cuDNN call; the
// time between consecutive events is charged to the later launch's name. With a busy GPU (the
// host ahead of it) that is the kernel's own time; idle gaps (a synchronize, a slow host) are
// charged to the next launch. Events are folded into per-name totals every kBatch marks and at
// exit, when the table (name, launches, total ms, share) goes to stderr. Not thread-safe beyond
// one launching thread, which is loom's model. Off by default: then the cost is one branch.
// Paused during a CUDA graph capture (set_kernel_profile_paused, cuda_graph.h). A benchmark can
// print one table per phase (cuda_profile_print_section, through print_device_profile_section).
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_graph.h"

namespace loom::cuda {

namespace {

constexpr size_t kBatch = 4096;

struct Totals {
  double ms = 0;
  int64_t launches = 0;
};

struct Profile {
  std::vector<cudaEvent_t> events;       // pool, reused after each fold
  std::vector<const char*> names;        // names[i] belongs to events[i]
  size_t used = 0;
  cudaEvent_t last{};                    // the last event of the previous fold
  bool has_last = false;
  std::map<std::string, Totals> totals;
  bool sectioned = false;                // cuda_profile_print_section was called

  void fold() {
    if (used == 0) return;
    (void)cudaEventSynchronize(events[used - 1]);
    for (size_t i = 0; i < used; ++i) {
      float ms = 0;
      if (i > 0) (void)cudaEventElapsedTime(&ms, events[i - 1], events[i]);
      else if (has_last) (void)cudaEventElapsedTime(&ms, last, events[0]);
      Totals& t = totals[names[i]];
      t.ms += ms, t.launches += 1;
    }
    std::swap(last, events[used - 1]);  // keep the newest as the next fold's origin
    if (!has_last) events[used - 1] = nullptr, has_last = true;
    used = 0;
  }

  void mark(const char* name) {
    if (used == events.size()) {
      if (events.size() < kBatch) events.push_back(nullptr);
      else fold();
    }
    if (used == events.size()) events.push_back(nullptr);
    if (!events[used]) (void)cudaEventCreate(&events[used]);
    names.resize(events.size());
    names[used] = name;
    (void)cudaEventRecord(events[used], compute_stream());
    ++used;
  }

  void report(const char* title = nullptr) {
    fold();
    if (title) std::fprintf(stderr, "== %s\n", title);
    double all = 0;
    int64_t launches = 0;
    std::vector<std::pair<std::string, Totals>> rows(totals.begin(), totals.end());
    for (const auto& r : rows) all += r.second.ms, launches += r.second.launches;
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
    std::fprintf(stderr, "LOOM_CUDA_PROFILE: %.1f ms over %lld launches (time between consecutive launches' ends)\n",
                 all, static_cast<long long>(launches));
    for (const auto& r : rows)
      std::fprintf(stderr, "  %5.1f%%  %9.2f ms  %8lld  %s\n", all > 0 ? 100.0 * r.second.ms / all : 0.0, r.second.ms,
                   static_cast<long long>(r.second.launches), r.first.c_str());
  }
};

Profile& profile() {
  static Profile* p = [] {
    auto* q = new Profile;  // never destroyed: reported from atexit, before CUDA's own teardown
    std::atexit([] {
      Profile& pr = profile();
      pr.report(pr.sectioned ? "the rest of the run (after the last section)" : nullptr);
    });
    return q;
  }();
  return *p;
}

}  // namespace

namespace {
std::atomic<bool> g_paused{false};
}  // namespace

bool kernel_profile_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("LOOM_CUDA_PROFILE");
    return v && *v && std::string(v) != "0";
  }();
  return on && !g_paused.load(std::memory_order_relaxed);
}

void set_kernel_profile_paused(bool paused) noexcept { g_paused.store(paused, std::memory_order_relaxed); }

void kernel_profile_mark(const char* name) { profile().mark(name); }

}  // namespace loom::cuda

namespace loom {
void cuda_profile_print_section(const char* title) {
  if (!cuda::kernel_profile_enabled()) return;
  cuda::Profile& p = cuda::profile();
  p.report(title);
  p.sectioned = true;
  p.totals.clear();  // the next section starts from here (the table at exit: what follows)
}
}  // namespace loom
