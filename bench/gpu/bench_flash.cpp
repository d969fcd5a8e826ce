// Attention on a CUDA device: loom's flash (and math) backends, bf16 (or --dtype), forward and
// forward+backward, at Stable Diffusion's shapes. Median of --reps (default 30) after 5 warm-up
// calls, each call timed with CUDA events; peak device memory of the timed calls (loom's caching
// allocator) next to the bytes the inputs, outputs and gradients need. Not a test.
//
//   loom_bench_flash [--dtype bf16|f16|f32|tf32] [--backend flash|math] [--reps N] [--json]
//
// tf32 is f32 storage with allow_tf32() on (--precision tf32: TF32 tensor-core flash kernels,
// TF32 cuBLAS GEMMs for math). The default (bf16) run ends with tf32 rows at (2,8,4096,64) and
// (2,8,4096,40), the rows bench/gpu/torch_attention.py prints for PyTorch's f32 SDPA with TF32.
//   [--shape B,H,Q,K,d]… (repeatable) replaces the default shapes (e.g. to profile one kernel
//   with ncu; no tf32 rows then); --kv-only adds a pass "bwd_kv": forward+backward with q not
//   requiring grad (no dQ), which sizes the dQ share of the backward by difference.
//
// TFLOP/s counts the forward as 4·B·H·Q·K·d and forward+backward as 3.5 times that, as the
// PyTorch figures in docs/gpu-bench.md do (bench/gpu/torch_attention.py prints the same table).
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "attention/sdpa.h"
#include "tensor/backend.h"
#include "bench/gpu/device_timing.h"
#include "tensor/device_timer.h"
#include "tensor/precision.h"
#include "tensor/random.h"

using namespace loom;

namespace {

struct Shape4 {
  int64_t b, h, q, k, d;
};

using bench::median_ms;

struct Run {
  DType dtype = DType::BF16;
  bool tf32 = false;  // f32 with allow_tf32()
  std::string backend = "flash";
  int reps = 30;
  bool json = false;
  bool kv_only = false;  // add the bwd_kv pass
  const char* label() const { return tf32 ? "tf32" : dtype_name(dtype); }
};

// Forward and forward+backward of one shape: one row each.
void bench_shape(const Run& r, const Shape4& s, Generator& gen) {
  const Device dev = Device::cuda(0);
  set_allow_tf32(r.tf32);
  const DType dt = r.dtype;
  const int64_t n = s.b * s.h;
  const Tensor q = Tensor::randn({n, s.q, s.d}, gen, dt, dev), k = Tensor::randn({n, s.k, s.d}, gen, dt, dev),
               v = Tensor::randn({n, s.k, s.d}, gen, dt, dev), dout = Tensor::randn({n, s.q, s.d}, gen, dt, dev);
  attention::SdpaOptions o;
  o.scale = 1.0 / std::sqrt(double(s.d));
  o.backend = attention::parse_backend(r.backend);
  const double fwd_flops = 4.0 * double(n) * double(s.q) * double(s.k) * double(s.d);
  const double io_bytes = double(itemsize(dt)) * double(n) * double(2 * s.q + 2 * s.k) * double(s.d);
  std::vector<const char*> passes = {"fwd", "fwdbwd"};
  if (r.kv_only) passes.push_back("bwd_kv");
  for (const char* pass : passes) {
    const bool bwd = std::strcmp(pass, "fwd") != 0, dq = std::strcmp(pass, "fwdbwd") == 0;
    reset_peak_device_memory(dev);
    const size_t base = device_memory(dev).in_use;
    const double ms = median_ms(dev, r.reps, [&] {
      if (!bwd) {
        NoGradGuard ng;
        attention::scaled_dot_product_attention(Variable(q), Variable(k), Variable(v), o);
        return;
      }
      Variable vq(q, dq), vk(k, true), vv(v, true);
      attention::scaled_dot_product_attention(vq, vk, vv, o).backward(dout);
    });
    const double peak_mb = double(device_memory(dev).peak - base) / 1e6 + io_bytes / 1e6;
    const double needed_mb = io_bytes * (bwd ? 2.0 : 1.0) / 1e6;
    const double tflops = fwd_flops * (bwd ? 3.5 : 1.0) / (ms * 1e-3) / 1e12;
    char shape[64];
    std::snprintf(shape, sizeof shape, "%lld,%lld,%lld,%lld,%lld", (long long)s.b, (long long)s.h, (long long)s.q,
                  (long long)s.k, (long long)s.d);
    if (r.json)
      std::printf("{\"impl\":\"loom_%s\",\"dtype\":\"%s\",\"shape\":\"%s\",\"pass\":\"%s\",\"ms\":%.4f,"
                  "\"tflops\":%.1f,\"peak_mb\":%.1f,\"needed_mb\":%.1f}\n",
                  r.backend.c_str(), r.label(), shape, pass, ms, tflops, peak_mb, needed_mb);
    else
      std::printf("%-6s %-24s %-7s %10.3f %9.1f %10.1f %10.1f\n", r.label(), shape, pass, ms, tflops, peak_mb,
                  needed_mb);
    std::fflush(stdout);
  }
  set_allow_tf32(false);
}

}  // namespace

int main(int argc, char** argv) {
  Run run;
  std::string dtype_arg = "bf16";
  std::vector<Shape4> given;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dtype" && i + 1 < argc) dtype_arg = argv[++i];
    else if (a == "--backend" && i + 1 < argc) run.backend = argv[++i];
    else if (a == "--reps" && i + 1 < argc) run.reps = std::atoi(argv[++i]);
    else if (a == "--json") run.json = true;
    else if (a == "--kv-only") run.kv_only = true;
    else if (a == "--shape" && i + 1 < argc) {
      Shape4 s{};
      if (std::sscanf(argv[++i], "%" SCNd64 ",%" SCNd64 ",%" SCNd64 ",%" SCNd64 ",%" SCNd64, &s.b, &s.h, &s.q, &s.k,
                      &s.d) != 5 ||
          s.b < 1 || s.h < 1 || s.q < 1 || s.k < 1 || s.d < 1) {
        std::fprintf(stderr, "loom_bench_flash: --shape %s: expected five positive integers B,H,Q,K,d\n", argv[i]);
        return 2;
      }
      given.push_back(s);
    } else {
      std::fprintf(stderr,
                   "usage: loom_bench_flash [--dtype bf16|f16|f32|tf32] [--backend flash|math] [--reps N] [--json] "
                   "[--shape B,H,Q,K,d]... [--kv-only]\n");
      return 2;
    }
  }
  if (!cuda_available()) {
    std::fprintf(stderr, "loom_bench_flash: no CUDA device\n");
    return 2;
  }
  run.tf32 = dtype_arg == "tf32";
  run.dtype = dtype_arg == "f16" ? DType::F16 : (dtype_arg == "f32" || run.tf32) ? DType::F32 : DType::BF16;
  std::vector<Shape4> shapes = {{2, 8, 4096, 4096, 40}, {2, 8, 4096, 4096, 64}, {2, 10, 4096, 4096, 64},
                                      {2, 20, 1024, 1024, 64}, {2, 8, 1024, 1024, 80}, {2, 8, 256, 256, 160},
                                      {2, 8, 4096, 77, 40},    {1, 8, 16384, 16384, 64}};
  if (!given.empty()) shapes = given;
  Generator gen(1);
  if (!run.json)
    std::printf("%-6s %-24s %-7s %10s %9s %10s %10s\n", "dtype", "B,H,Q,K,d", "pass", "ms", "TFLOP/s", "peak MB",
                "needed MB");
  for (const Shape4& s : shapes) {
    if (run.backend == "math" && s.q * s.k > 4096 * 4096) continue;  // the score matrix alone would be > 2 GB per head batch
    bench_shape(run, s, gen);
  }
  if (dtype_arg == "bf16" && given.empty()) {  // the default run: the tf32 rows to compare with PyTorch's f32 SDPA
    Run tf32 = run;
    tf32.dtype = DType::F32, tf32.tf32 = true;
    for (const Shape4& s : {Shape4{2, 8, 4096, 4096, 64}, Shape4{2, 8, 4096, 4096, 40}}) bench_shape(tf32, s, gen);
  }
  return 0;
}
