// The feed-forward's first product at Stable Diffusion's shapes on CUDA: the Linear + GEGLU kernel
// (ops::linear_geglu, tensor/cuda/cuda_gemm_wgmma.cu) against cuBLAS's projection (bias in its
// epilogue) followed by the GEGLU pass (LOOM_LINEAR_GEGLU=0), and cuBLAS's projection alone (the
// GEMM rate to match). Then the UNet's other Linear layers on loom's own kernel (LOOM_GEMM_WGMMA,
// the same main loop): those with a bias (to_out.0, ff.net.2, proj_in / proj_out) against
// cuBLASLt's bias epilogue, those without (to_q / to_k / to_v) against cuBLAS; and the 3×3
// convolutions' products W [O, 9C] · columns [N, 9C, L] (B N-major, LOOM_GEMM_WGMMA=conv) against
// cuBLAS's batched GEMM. Not a test.
//   ./bench/loom_bench_geglu [--reps N] [--dtype bf16|f16] [--shape rows,in,h ...] [--bias-shape rows,in,out ...]
//                            [--plain-shape rows,in,out ...] [--conv-shape O,9C,L ...]
// One line of JSON per shape: ms of each, TFLOP/s counted as 2·rows·in·2h for the GEGLU product
// and 2·rows·in·out for the others.
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
// rows, in, out of the bias GEMMs at the same levels: to_out.0 / proj (C → C), ff.net.2 (4C → C).
const std::vector<Shape3> kDefaultBiasShapes = {{32768, 640, 640},  {32768, 2560, 640}, {8192, 1280, 1280},
                                                {8192, 5120, 1280}, {32768, 320, 320},  {32768, 1280, 320}};
// rows, in, out of the q / k / v projections (no bias) at SDXL's two levels and SD 1.5's first.
const std::vector<Shape3> kDefaultPlainShapes = {{32768, 640, 640}, {8192, 1280, 1280}, {32768, 320, 320}};
// O, 9C, L of SDXL's 3×3 convolutions at its three levels, 8 samples (a guided step on 4).
const std::vector<Shape3> kDefaultConvShapes = {{320, 2880, 16384}, {640, 5760, 4096}, {1280, 11520, 1024}};
constexpr int64_t kConvSamples = 8;

// One JSON line: W [O, 9C] · columns [8, 9C, L] on loom's kernel (LOOM_GEMM_WGMMA=conv) and on
// cuBLAS's batched GEMM (unset).
void bench_conv(const Shape3& s, DType dtype, int reps, uint64_t& seed) {
  const Device gpu = Device::cuda(0);
  const Tensor w = ops::mul_scalar(random_normal({s.rows, s.in}, dtype, gpu, seed++), 1.0 / std::sqrt(double(s.in)));
  const Tensor cols = random_normal({kConvSamples, s.in, s.h}, dtype, gpu, seed++);
  setenv("LOOM_GEMM_WGMMA", "conv", 1);
  const double loom_ms = bench::median_ms(gpu, reps, [&] { ops::matmul(w, cols); });
  unsetenv("LOOM_GEMM_WGMMA");
  const double lib_ms = bench::median_ms(gpu, reps, [&] { ops::matmul(w, cols); });
  const double tflop = 2.0 * double(kConvSamples) * double(s.rows) * double(s.in) * double(s.h) * 1e-12;
  std::printf(
      "{\"conv_gemm\":{\"O\":%ld,\"K\":%ld,\"L\":%ld,\"samples\":%ld},\"dtype\":\"%s\",\"wgmma_ms\":%.4f,"
      "\"cublas_ms\":%.4f,\"wgmma_tflops\":%.1f,\"cublas_tflops\":%.1f}\n",
      s.rows, s.in, s.h, long(kConvSamples), dtype_name(dtype), loom_ms, lib_ms, tflop / (loom_ms * 1e-3),
      tflop / (lib_ms * 1e-3));
  std::fflush(stdout);
}

// One JSON line: x [rows, in]·W [out, in]ᵀ (+ b) on loom's kernel (LOOM_GEMM_WGMMA=all) and on
// cuBLAS(Lt) (unset).
void bench_linear(const Shape3& s, bool with_bias, DType dtype, int reps, uint64_t& seed) {
  const Device gpu = Device::cuda(0);
  const Tensor x = random_normal({s.rows, s.in}, dtype, gpu, seed++);
  const Tensor w = ops::mul_scalar(random_normal({s.h, s.in}, dtype, gpu, seed++), 1.0 / std::sqrt(double(s.in)));
  const Tensor b = with_bias ? random_normal({s.h}, dtype, gpu, seed++) : Tensor();
  setenv("LOOM_GEMM_WGMMA", "all", 1);
  const double loom_ms = bench::median_ms(gpu, reps, [&] { ops::linear(x, w, b); });
  unsetenv("LOOM_GEMM_WGMMA");
  const double lib_ms = bench::median_ms(gpu, reps, [&] { ops::linear(x, w, b); });
  const double tflop = 2.0 * double(s.rows) * double(s.in) * double(s.h) * 1e-12;
  std::printf(
      "{\"linear\":{\"rows\":%ld,\"in\":%ld,\"out\":%ld,\"bias\":%s},\"dtype\":\"%s\",\"wgmma_ms\":%.4f,"
      "\"cublas_ms\":%.4f,\"wgmma_tflops\":%.1f,\"cublas_tflops\":%.1f}\n",
      s.rows, s.in, s.h, with_bias ? "true" : "false", dtype_name(dtype), loom_ms, lib_ms, tflop / (loom_ms * 1e-3),
      tflop / (lib_ms * 1e-3));
  std::fflush(stdout);
}

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
  std::vector<Shape3> shapes, bias_shapes, plain_shapes, conv_shapes;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--reps" && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (a == "--dtype" && i + 1 < argc) dtype = std::string(argv[++i]) == "f16" ? DType::F16 : DType::BF16;
    else if (a == "--shape" && i + 1 < argc) shapes.push_back(parse_shape(argv[++i]));
    else if (a == "--bias-shape" && i + 1 < argc) bias_shapes.push_back(parse_shape(argv[++i]));
    else if (a == "--plain-shape" && i + 1 < argc) plain_shapes.push_back(parse_shape(argv[++i]));
    else if (a == "--conv-shape" && i + 1 < argc) conv_shapes.push_back(parse_shape(argv[++i]));
    else {
      std::fprintf(stderr, "usage: loom_bench_geglu [--reps N] [--dtype bf16|f16] [--shape rows,in,h ...] "
                   "[--bias-shape rows,in,out ...] [--plain-shape rows,in,out ...] [--conv-shape O,9C,L ...]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  if (shapes.empty() && bias_shapes.empty() && plain_shapes.empty() && conv_shapes.empty()) {
    shapes = kDefaultShapes, bias_shapes = kDefaultBiasShapes, plain_shapes = kDefaultPlainShapes;
    conv_shapes = kDefaultConvShapes;
  }
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
  for (const Shape3& s : bias_shapes) bench_linear(s, true, dtype, reps, seed);
  for (const Shape3& s : plain_shapes) bench_linear(s, false, dtype, reps, seed);
  for (const Shape3& s : conv_shapes) bench_conv(s, dtype, reps, seed);
  return 0;
}
