// Scaled dot-product attention throughput and memory on the CPU, f32, per backend.
//
//   loom_bench_attention [--json] [--quick] [--filter SUBSTR]
//
// Each configuration (backend, B, H, S = Q = K, d = dv, pass) runs in a fresh child
// process of this same executable (posix_spawn of /proc/self/exe with
// `--run backend B H S d pass sgemm_gflops min_seconds`), so that its peak RSS
// (VmHWM, see peak_rss_mib()) belongs to that configuration alone and OpenMP starts clean.
// The child prints one JSON line; the parent collects the lines and prints them
// (--json) or a table.
//
// Passes:
//   fwd     forward only, under NoGradGuard, inputs not requiring grad;
//           flops = 4·B·H·Q·K·d (two GEMM-shaped products).
//   fwdbwd  inputs requiring grad, forward + out.backward(dout) with a random dout,
//           zero_grad between repeats; flops = 3.5 × the forward's.
// Inputs: f32, Tensor::randn from a seeded loom::Generator (in chunks; see randn_chunked).
// Timing: one warm-up call, then repeats until at least 3 have run and `min_seconds`
// (1.5 s; 0.25 s with --quick) have passed; the median repeat is reported.
//
// Fields of each line: backend, B, H, Q, K, d, pass, ms, gflops, sgemm_gflops (f32
// loom::ops::matmul 2048×2048, median of 5, measured once in the parent), peak_rss_mib
// (the child's VmHWM after the timed runs; see peak_rss_mib() for why not ru_maxrss),
// needed_mib (MiB of f32 inputs, outputs and gradients: fwd q,k,v,out; fwdbwd also
// dout,dq,dk,dv), base_rss_mib (the child's peak RSS before it allocates anything),
// inputs_rss_mib (after q, k, v and dout exist, before the first call) and reps.
// The table adds, for flash rows, gflops as a percentage of sgemm_gflops.
//
// --quick keeps the two smallest shapes (smoke test); --filter keeps the
// configurations whose name ("flash/fwdbwd/1x8x1024x64") contains SUBSTR.
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "attention/sdpa.h"
#include "autograd/variable.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tensor/tensor.h"

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;
using loom::Shape;
using loom::Tensor;
using loom::Variable;
namespace attn = loom::attention;

struct Config {
  std::string backend;  // "math" | "flash"
  int64_t B, H, S, d;
  std::string pass;  // "fwd" | "fwdbwd"

  std::string name() const {
    return backend + "/" + pass + "/" + std::to_string(B) + "x" + std::to_string(H) + "x" +
           std::to_string(S) + "x" + std::to_string(d);
  }
};

double elapsed_ms(Clock::time_point t0, Clock::time_point t1) {
  return std::chrono::duration<double, std::milli>(t1 - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double round_to(double x, int digits) {
  const double f = std::pow(10.0, digits);
  return std::round(x * f) / f;
}

// Peak resident set of this process image so far, MiB. VmHWM (/proc/self/status) is
// the high-water mark of the current address space, fresh at exec. getrusage's
// ru_maxrss (KiB on Linux) is only the fallback: Linux folds the pre-exec image's
// peak into it (exec_mmap -> setmax_mm_hiwater_rss), and with posix_spawn that image
// is the parent's, so a child would report at least the parent's peak.
double peak_rss_mib() {
  if (std::FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    long long kib = -1;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "VmHWM: %lld kB", &kib) == 1) break;
    std::fclose(f);
    if (kib >= 0) return double(kib) / 1024.0;
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return double(ru.ru_maxrss) / 1024.0;
}

// f32 GEMM rate of this machine: loom::ops::matmul of 2048×2048, one warm-up, median of 5.
double measure_sgemm_gflops() {
  const int64_t n = 2048;
  loom::Generator gen(1);
  const Tensor a = Tensor::randn({n, n}, gen);
  const Tensor b = Tensor::randn({n, n}, gen);
  { Tensor c = loom::ops::matmul(a, b); }
  std::vector<double> ms;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    Tensor c = loom::ops::matmul(a, b);
    ms.push_back(elapsed_ms(t0, Clock::now()));
  }
  return 2.0 * double(n) * double(n) * double(n) / (median(ms) * 1e-3) / 1e9;
}

double forward_flops(const Config& c) {
  return 4.0 * double(c.B * c.H) * double(c.S) * double(c.S) * double(c.d);
}

double flops(const Config& c) { return (c.pass == "fwd" ? 1.0 : 3.5) * forward_flops(c); }

// MiB of f32 inputs, outputs and gradients: fwd q,k,v,out; fwdbwd also dout,dq,dk,dv.
double needed_mib(const Config& c) {
  const double per_tensor = double(c.B * c.H) * double(c.S) * double(c.d);  // q, k, v, out all [N, S, d]
  const double tensors = c.pass == "fwd" ? 4.0 : 8.0;
  return tensors * per_tensor * 4.0 / (1024.0 * 1024.0);
}

// ---- child: one configuration ------------------------------------------------------

// f32 normal values of `shape` from `gen`, drawn by Tensor::randn in chunks of 64 Ki
// elements and copied into place: randn builds a std::vector<double> and converts it,
// which for a whole 16384×64 input would leave transients (≥ 8 MiB) in the peak RSS
// that belong to the benchmark's setup, not to attention.
Tensor randn_chunked(const Shape& shape, loom::Generator& gen) {
  const Tensor t = Tensor::empty(shape);
  const Tensor flat = t.view({-1});
  const int64_t n = flat.numel(), chunk = int64_t(1) << 16;
  for (int64_t off = 0; off < n; off += chunk) {
    const int64_t len = std::min(chunk, n - off);
    flat.narrow(0, off, len).copy_(Tensor::randn({len}, gen));
  }
  return t;
}

int run_child(const Config& c, double sgemm_gflops, double min_seconds) {
  const double base_rss = peak_rss_mib();
  const int64_t N = c.B * c.H;
  loom::Generator gen(42);
  const bool grad = c.pass == "fwdbwd";
  // q [N, Q, d], k [N, K, d], v [N, K, d]; dout [N, Q, d].
  Variable q(randn_chunked({N, c.S, c.d}, gen), grad);
  Variable k(randn_chunked({N, c.S, c.d}, gen), grad);
  Variable v(randn_chunked({N, c.S, c.d}, gen), grad);
  const Tensor dout = grad ? randn_chunked({N, c.S, c.d}, gen) : Tensor();
  const double inputs_rss = peak_rss_mib();

  attn::SdpaOptions opt;
  opt.heads = c.H;
  opt.scale = 1.0 / std::sqrt(double(c.d));
  opt.backend = attn::parse_backend(c.backend, "--run backend");

  auto once = [&] {
    if (grad) {
      q.zero_grad();
      k.zero_grad();
      v.zero_grad();
      Variable out = attn::scaled_dot_product_attention(q, k, v, opt);
      out.backward(dout);
    } else {
      loom::NoGradGuard no_grad;
      Variable out = attn::scaled_dot_product_attention(q, k, v, opt);
    }
  };

  once();  // warm-up
  std::vector<double> ms;
  const auto start = Clock::now();
  while (ms.size() < 3 || (elapsed_ms(start, Clock::now()) < min_seconds * 1e3 && ms.size() < 1000)) {
    const auto t0 = Clock::now();
    once();
    ms.push_back(elapsed_ms(t0, Clock::now()));
  }
  const double peak = peak_rss_mib();
  const double t = median(ms);

  nlohmann::ordered_json j;
  j["backend"] = c.backend;
  j["B"] = c.B;
  j["H"] = c.H;
  j["Q"] = c.S;
  j["K"] = c.S;
  j["d"] = c.d;
  j["pass"] = c.pass;
  j["ms"] = round_to(t, 3);
  j["gflops"] = round_to(flops(c) / (t * 1e-3) / 1e9, 2);
  j["sgemm_gflops"] = round_to(sgemm_gflops, 2);
  j["peak_rss_mib"] = round_to(peak, 1);
  j["needed_mib"] = round_to(needed_mib(c), 1);
  j["base_rss_mib"] = round_to(base_rss, 1);
  j["inputs_rss_mib"] = round_to(inputs_rss, 1);
  j["reps"] = ms.size();
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);
  return 0;
}

// ---- parent: spawn a child per configuration -------------------------------------------

// Runs `self --run ...` for `c`; returns its stdout's first line ("" on failure, with
// `why` set). The child's stderr goes straight to ours.
std::string spawn_child(const std::string& self, const Config& c, double sgemm, double min_seconds,
                        std::string& why) {
  int fds[2];
  if (pipe(fds) != 0) {
    why = std::string("pipe: ") + std::strerror(errno);
    return "";
  }
  const std::vector<std::string> args = {self,
                                         "--run",
                                         c.backend,
                                         std::to_string(c.B),
                                         std::to_string(c.H),
                                         std::to_string(c.S),
                                         std::to_string(c.d),
                                         c.pass,
                                         std::to_string(sgemm),
                                         std::to_string(min_seconds)};
  std::vector<char*> argv;
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[1]);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  if (rc != 0) {
    close(fds[0]);
    why = std::string("posix_spawn: ") + std::strerror(rc);
    return "";
  }

  std::string output;
  char buf[4096];
  for (;;) {
    const ssize_t n = read(fds[0], buf, sizeof buf);
    if (n > 0) {
      output.append(buf, size_t(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      break;
    }
  }
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status)) {
    why = std::string("child killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
          strsignal(WTERMSIG(status)) + ")";
    return "";
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    why = "child exited with status " + std::to_string(WEXITSTATUS(status));
    return "";
  }
  const size_t nl = output.find('\n');
  std::string line = output.substr(0, nl);
  if (line.empty()) why = "child printed nothing";
  return line;
}

std::vector<Config> all_configs(bool quick) {
  struct Shape {
    int64_t B, H, S, d;
  };
  std::vector<Shape> both = {{1, 8, 1024, 64}, {2, 8, 1024, 40}};
  std::vector<Shape> flash_only;
  if (!quick) {
    both.push_back({1, 8, 4096, 64});
    flash_only.push_back({1, 1, 16384, 64});
  }
  std::vector<Config> configs;
  for (const Shape& s : both)
    for (const char* backend : {"math", "flash"})
      for (const char* pass : {"fwd", "fwdbwd"}) configs.push_back({backend, s.B, s.H, s.S, s.d, pass});
  for (const Shape& s : flash_only)
    for (const char* pass : {"fwd", "fwdbwd"}) configs.push_back({"flash", s.B, s.H, s.S, s.d, pass});
  return configs;
}

void print_header() {
  std::printf("%-7s %-7s %3s %3s %6s %6s %4s %11s %9s %12s %8s %11s %13s\n", "backend", "pass", "B", "H", "Q",
              "K", "d", "ms", "gflops", "sgemm_gflops", "%sgemm", "needed_mib", "peak_rss_mib");
  std::fflush(stdout);
}

void print_row(const nlohmann::json& j) {
  const std::string backend = j.at("backend").get<std::string>();
  const double gflops = j.at("gflops").get<double>(), sgemm = j.at("sgemm_gflops").get<double>();
  char pct[32] = "-";
  if (backend == "flash") std::snprintf(pct, sizeof pct, "%.1f%%", 100.0 * gflops / sgemm);
  std::printf("%-7s %-7s %3lld %3lld %6lld %6lld %4lld %11.2f %9.2f %12.2f %8s %11.1f %13.1f\n",
              backend.c_str(), j.at("pass").get<std::string>().c_str(), (long long)j.at("B").get<int64_t>(),
              (long long)j.at("H").get<int64_t>(), (long long)j.at("Q").get<int64_t>(),
              (long long)j.at("K").get<int64_t>(), (long long)j.at("d").get<int64_t>(),
              j.at("ms").get<double>(), gflops, sgemm, pct, j.at("needed_mib").get<double>(),
              j.at("peak_rss_mib").get<double>());
  std::fflush(stdout);
}

// The first three fields of /proc/loadavg (other work on the machine skews the timings).
std::string load_average() {
  double a = 0, b = 0, c = 0;
  std::FILE* f = std::fopen("/proc/loadavg", "r");
  const bool ok = f && std::fscanf(f, "%lf %lf %lf", &a, &b, &c) == 3;
  if (f) std::fclose(f);
  if (!ok) return "unknown";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f %.2f %.2f", a, b, c);
  return buf;
}

int usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--json] [--quick] [--filter SUBSTR]\n"
               "       (internal) %s --run math|flash B H S d fwd|fwdbwd sgemm_gflops min_seconds\n",
               argv0, argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc >= 2 && std::string(argv[1]) == "--run") {
      if (argc != 10) return usage(argv[0]);
      const Config c{
          argv[2], std::stoll(argv[3]), std::stoll(argv[4]), std::stoll(argv[5]), std::stoll(argv[6]),
          argv[7]};
      if (c.pass != "fwd" && c.pass != "fwdbwd") return usage(argv[0]);
      return run_child(c, std::stod(argv[8]), std::stod(argv[9]));
    }

    bool json = false, quick = false;
    std::string filter;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--json") {
        json = true;
      } else if (a == "--quick") {
        quick = true;
      } else if (a == "--filter" && i + 1 < argc) {
        filter = argv[++i];
      } else {
        return usage(argv[0]);
      }
    }

    std::vector<Config> configs;
    for (const Config& c : all_configs(quick))
      if (filter.empty() || c.name().find(filter) != std::string::npos) configs.push_back(c);
    if (configs.empty()) {
      std::fprintf(stderr, "no configuration matches --filter %s\n", filter.c_str());
      return 1;
    }

    const double sgemm = measure_sgemm_gflops();
    const double min_seconds = quick ? 0.25 : 1.5;
    if (!json) {
      std::printf("f32 sgemm (loom::ops::matmul 2048x2048, median of 5): %.2f GFLOP/s; load average %s\n\n",
                  sgemm, load_average().c_str());
      print_header();
    }
    int failures = 0;
    for (const Config& c : configs) {
      std::string why;
      const std::string line = spawn_child(argv[0], c, sgemm, min_seconds, why);
      if (line.empty()) {
        ++failures;
        std::fprintf(stderr, "%s: FAILED: %s\n", c.name().c_str(), why.c_str());
        continue;
      }
      if (json) {
        std::printf("%s\n", line.c_str());
        std::fflush(stdout);
      } else {
        print_row(nlohmann::json::parse(line));
      }
    }
    return failures ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "loom_bench_attention: %s\n", e.what());
    return 1;
  }
}
