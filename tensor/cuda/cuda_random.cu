// Counter-based random numbers on CUDA (params in cuda_fused.h, the transformation in
// tensor/philox.h): one thread per element in a grid-stride loop, each element from its own
// Philox block, so the values equal the CPU kernel's bit for bit whatever the launch shape
// (this file is compiled with --fmad=false; ln and cos come from philox.h, not CUDA's libm).
#include "tensor/cuda/cuda_device.cuh"
#include "tensor/cuda/cuda_fused.h"
#include "tensor/philox.h"

namespace loom::cuda {
namespace {

// Significand bits of the storage type: the grid of its uniform values.
template <typename T>
constexpr int kDigits = std::is_same_v<T, double> ? 53 : std::is_same_v<T, float> ? 24 : std::is_same_v<T, __half> ? 11 : 8;

template <typename T, RandomKind kKind>
__global__ void random_kernel(const RandomParams p) {
  T* out = static_cast<T*>(p.out);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel; i += int64_t(gridDim.x) * blockDim.x) {
    const philox::Block b = philox::element_block(p.seed, p.offset, uint64_t(i));
    double v;
    if constexpr (kKind == RandomKind::Uniform) v = philox::uniform(b, kDigits<T>);
    else if constexpr (kKind == RandomKind::Normal) v = philox::normal(b);
    else v = philox::dropout_keep(b, p.p) ? p.scale : 0.0;
    out[i] = narrow<T>(v);  // 16-bit floats through float, as on the CPU
  }
}

}  // namespace

void launch_random(const RandomParams& p) {
  if (p.numel == 0) return;
  dispatch_float(p.dtype, "cuda random", [&](auto tag) {
    using T = decltype(tag);
    const unsigned grid = grid_for(p.numel);
    switch (p.kind) {
      case RandomKind::Uniform: random_kernel<T, RandomKind::Uniform><<<grid, kThreads, 0, compute_stream()>>>(p); break;
      case RandomKind::Normal: random_kernel<T, RandomKind::Normal><<<grid, kThreads, 0, compute_stream()>>>(p); break;
      case RandomKind::DropoutMask: random_kernel<T, RandomKind::DropoutMask><<<grid, kThreads, 0, compute_stream()>>>(p); break;
    }
    check_last_launch("random_kernel");
  });
}

}  // namespace loom::cuda
