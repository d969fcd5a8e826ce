// The feed-forward's first product at Stable Diffusion's shapes on CUDA: the Linear + GEGLU kernel
// (ops::linear_geglu, tensor/cuda/cuda_gemm_geglu.cu) against cuBLAS's projection (bias in its
// epilogue) followed by the GEGLU pass (LOOM_LINEAR_GEGLU=0), and cuBLAS's projection alone (the
// GEMM rate to match). Not a test.
//   ./bench/loom_bench_geglu [--reps N] [--dtype bf16|f16] [--shape rows,in,h ...]
// One line of JSON per shape: ms of each, TFLOP/s counted as 2·rows·in·2h for the product.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bench/gpu/device_timing.h"
#include "tensor/ops.h"
#include "tensor/ops_fused.h"
#include "tensor/random.h"

using namespace loom;

namespace {

struct Shape3 {
  int64_t rows, in, h;
};

// SDXL at 128×128 latents, batch 8 (a guided step on 4): levels 1 and 2; SD 1.5 at 64×64, batch 8:
// levels 0, 1, 2.
const std::vector<Shape3> kDefaultShapes = {{32768, 640, 2560},  {8192, 1280, 5120}, {32768, 320, 1280},
                                            {8192, 640, 2560},   {2048, 1280, 5120}};

Shape3 parse_shape(const char* s) {
  Shape3 r{};
  if (std::sscanf(s, "%ld,%ld,%ld", &r.rows, &r.in, &r.h) != 3 || r.rows <= 0 || r.in <= 0 || r.h <= 0) {
    std::fprintf(stderr, "--shape '%s' is not rows,in,h\n", s);
    std::exit(2);
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 30;
  DType dtype = DType::BF16;
  std::vector<Shape3> shapes;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (a == "--dtype" && i + 1 < argc) dtype = std::string(argv[++i]) == "f16" ? DType::F16 : DType::BF16;
    else if (a == "--shape" && i + 1 < argc) shapes.push_back(parse_shape(argv[++i]));
    else {
      std::fprintf(stderr, "usage: loom_bench_geglu [--reps N] [--dtype bf16|f16] [--shape rows,in,h ...]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  if (shapes.empty()) shapes = kDefaultShapes;
  const Device gpu = Device::cuda(0);
  uint64_t seed = 7;
  for (const Shape3& s : shapes) {
    const Tensor x = random_normal({s.rows, s.in}, dtype, gpu, seed++);
    const Tensor w = ops::mul_scalar(random_normal({2 * s.h, s.in}, dtype, gpu, seed++), 1.0 / std::sqrt(double(s.in)));
    const Tensor b = random_normal({2 * s.h}, dtype, gpu, seed++);
    setenv("LOOM_LINEAR_GEGLU", "1", 1);
    const double fused = bench::median_ms(gpu, reps, [&] { ops::linear_geglu(x, w, b); });
    setenv("LOOM_LINEAR_GEGLU_EPILOGUE", "warpgroup", 1);
    const double staged = bench::median_ms(gpu, reps, [&] { ops::linear_geglu(x, w, b); });
    unsetenv("LOOM_LINEAR_GEGLU_EPILOGUE");
    setenv("LOOM_LINEAR_GEGLU", "0", 1);
    const double composed = bench::median_ms(gpu, reps, [&] { ops::linear_geglu(x, w, b); });
    const double gemm = bench::median_ms(gpu, reps, [&] { ops::linear(x, w, b); });
    unsetenv("LOOM_LINEAR_GEGLU");
    const double tflop = 2.0 * double(s.rows) * double(s.in) * double(2 * s.h) * 1e-12;
    std::printf(
        "{\"rows\":%ld,\"in\":%ld,\"h\":%ld,\"dtype\":\"%s\",\"fused_ms\":%.4f,\"fused_epilogue_warpgroup_ms\":%.4f,\"composed_ms\":%.4f,"
        "\"cublas_projection_ms\":%.4f,\"fused_tflops\":%.1f,\"cublas_tflops\":%.1f}\n",
        s.rows, s.in, s.h, dtype_name(dtype), fused, staged, composed, gemm, tflop / (fused * 1e-3), tflop / (gemm * 1e-3));
    std::fflush(stdout);
  }
  return 0;
}
