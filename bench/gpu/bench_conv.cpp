// 2-D convolution on a CUDA device at Stable Diffusion UNet shapes (SDXL at 128×128 latents,
// SD 1.5 at 64×64, batch 4), through each path of LOOM_CONV (set for each row): loom's
// implicit-GEMM kernel ("loom_igemm"), im2col + cuBLAS ("loom_im2col") and cuDNN ("loom_cudnn",
// where the build has it): the forward with bias ("fwd"), the gradient w.r.t. the input
// ("bwd_input"; igemm at stride 2 takes GEMM + col2im) and w.r.t. the weight ("bwd_weight";
// im2col + GEMM except with cuDNN), bf16 (or --dtype f16). Median of --reps (default 20) after 5
// warm-ups, each call timed with CUDA events; peak device memory of the timed calls above what
// was held before (inputs excluded). bench/gpu/torch_conv.py prints PyTorch's (cuDNN) rows at the
// same shapes in the same format; run both in one call. Not a test.
//
//   loom_bench_conv [--dtype bf16|f16] [--reps N] [--json]
//
// "shape" is "N,C,H,W,O,k,stride" (padding k / 2); TFLOP/s counts 2·N·O·oh·ow·C·k·k for each pass.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/gpu/device_timing.h"
#include "tensor/backend.h"
#include "tensor/conv.h"
#include "tensor/device_timer.h"
#include "tensor/random.h"

using namespace loom;

namespace {

struct ConvShape {
  const char* name;
  int64_t n, c, o, h, w, k, stride, pad;
};

// The convolutions of the UNets' resnets, samplers and skip paths.
const std::vector<ConvShape> kShapes = {
    {"sdxl_320_128", 4, 320, 320, 128, 128, 3, 1, 1},   {"sdxl_640_64", 4, 640, 640, 64, 64, 3, 1, 1},
    {"sdxl_1280_32", 4, 1280, 1280, 32, 32, 3, 1, 1},   {"sdxl_960to320_128", 4, 960, 320, 128, 128, 3, 1, 1},
    {"sdxl_960to320_1x1", 4, 960, 320, 128, 128, 1, 1, 0}, {"sdxl_down_320_s2", 4, 320, 320, 128, 128, 3, 2, 1},
    {"sdxl_conv_in_4", 4, 4, 320, 128, 128, 3, 1, 1},   {"sd15_320_64", 4, 320, 320, 64, 64, 3, 1, 1},
    {"sd15_640_32", 4, 640, 640, 32, 32, 3, 1, 1},      {"sd15_1280_16", 4, 1280, 1280, 16, 16, 3, 1, 1},
};


}  // namespace

int main(int argc, char** argv) {
  std::string dtype_arg = "bf16";
  int reps = 20;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dtype" && i + 1 < argc) dtype_arg = argv[++i];
    else if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (a == "--json") json = true;
    else {
      std::fprintf(stderr, "usage: loom_bench_conv [--dtype bf16|f16] [--reps N] [--json]\n");
      return 2;
    }
  }
  if (dtype_arg != "bf16" && dtype_arg != "f16") {
    std::fprintf(stderr, "loom_bench_conv: --dtype must be bf16 or f16, got %s\n", dtype_arg.c_str());
    return 2;
  }
  if (reps < 1) {
    std::fprintf(stderr, "loom_bench_conv: --reps must be positive\n");
    return 2;
  }
  if (!cuda_available()) {
    std::fprintf(stderr, "loom_bench_conv: no CUDA device\n");
    return 2;
  }
  const DType dt = dtype_arg == "f16" ? DType::F16 : DType::BF16;
  const Device dev = Device::cuda(0);
  Generator gen(1);
  if (!json) std::printf("%-12s %-20s %-10s %10s %9s %10s\n", "impl", "name", "pass", "ms", "TFLOP/s", "peak MB");
  for (const ConvShape& s : kShapes) {
    const ops::Conv2dParams p{s.stride, s.stride, s.pad, s.pad};
    const Tensor x = Tensor::randn({s.n, s.c, s.h, s.w}, gen, dt, dev);
    const Tensor w = Tensor::randn({s.o, s.c, s.k, s.k}, gen, dt, dev);
    const Tensor b = Tensor::randn({s.o}, gen, dt, dev);
    const Im2ColArgs g = ops::conv2d_geometry(x.shape(), s.k, s.k, p);
    const Tensor dy = Tensor::randn({s.n, s.o, g.out_h, g.out_w}, gen, dt, dev);
    const double flops = 2.0 * s.n * s.o * g.out_h * g.out_w * s.c * s.k * s.k;
    std::vector<std::string> paths = {"igemm", "im2col"};
    if (backend_for(dev).supports(OpKind::Conv2dLibrary, dt)) paths.push_back("cudnn");
    for (const std::string& path : paths) {
      ::setenv("LOOM_CONV", path.c_str(), 1);
      for (const char* pass : {"fwd", "bwd_input", "bwd_weight"}) {
        const std::string which = pass;
        auto call = [&] {
          if (which == "bwd_input") (void)ops::conv2d_input_grad(dy, w, x.shape(), p);
          else if (which == "bwd_weight") (void)ops::conv2d_weight_grad(dy, x, w.shape(), p);
          else (void)ops::conv2d(x, w, b, p);
        };
        backend_for(dev).synchronize(dev.index);
        const size_t before = device_memory(dev).in_use;
        reset_peak_device_memory(dev);
        const double ms = bench::median_ms(dev, reps, call);
        const size_t peak = device_memory(dev).peak;
        const double peak_mb = double(peak > before ? peak - before : 0) / 1e6;
        const std::string impl = "loom_" + path;
        const double tflops = flops / (ms * 1e-3) / 1e12;
        if (json)
          std::printf("{\"impl\": \"%s\", \"dtype\": \"%s\", \"name\": \"%s\", \"shape\": \"%lld,%lld,%lld,%lld,%lld,%lld,%lld\", "
                      "\"pass\": \"%s\", \"ms\": %.4f, \"tflops\": %.1f, \"peak_mb\": %.1f}\n",
                      impl.c_str(), dtype_arg.c_str(), s.name, (long long)s.n, (long long)s.c, (long long)s.h,
                      (long long)s.w, (long long)s.o, (long long)s.k, (long long)s.stride, pass, ms, tflops, peak_mb);
        else
          std::printf("%-12s %-20s %-10s %10.4f %9.1f %10.1f\n", impl.c_str(), s.name, pass, ms, tflops, peak_mb);
        std::fflush(stdout);
      }
    }
    ::unsetenv("LOOM_CONV");
  }
  return 0;
}
