// The CUDA kernels of the counter-based RNG (tensor/cuda/cuda_random.cu) and of loss scaling's
// unscale + finite check (tensor/cuda/cuda_optim.cu) against the CPU kernels, bit for bit:
// uniform / normal / dropout masks in every floating dtype, at sizes that are not multiples of
// the block or the grid, at offsets whose counters carry into the second word and past the
// grid-stride wrap; the dropout op on CUDA tensors; unscaling tables longer than one launch
// with inf / nan anywhere. Skipped without a CUDA device (ctest -L gpu).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "optim/grad_scaler.h"
#include "tensor/backend.h"
#include "tensor/ops.h"
#include "tensor/ops_fused.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom {
namespace {

const Device kCuda = Device::cuda(0);
const DType kFloatTypes[] = {DType::F32, DType::F64, DType::BF16, DType::F16};

// Bitwise equality through the values (every dtype's values are exact in double; NaN never occurs).
void expect_same_bits(const Tensor& gpu, const Tensor& cpu, const std::string& what) {
  ASSERT_EQ(gpu.device(), kCuda) << what;
  ASSERT_EQ(gpu.shape(), cpu.shape()) << what;
  ASSERT_EQ(gpu.dtype(), cpu.dtype()) << what;
  const std::vector<double> g = gpu.to(Device::cpu()).to_vector(), c = cpu.to_vector();
  size_t differ = 0, first = 0;
  for (size_t i = 0; i < c.size(); ++i)
    if (g[i] != c[i] && differ++ == 0) first = i;
  EXPECT_EQ(differ, 0u) << what << ": " << differ << " of " << c.size() << " elements differ, first at " << first
                        << " (cuda " << g[first] << ", cpu " << c[first] << ")";
}

struct Draw {
  int64_t n;
  uint64_t seed, offset;
};

// Sizes: one element, a partial block, a partial grid, more than one grid (65535 blocks of 256
// threads: the grid-stride loop wraps); offsets that carry into the counter's second word.
const Draw kDraws[] = {
    {1, 0, 0},
    {1000, 7, 0},
    {257 * 33 + 5, 123456789, 0xfffffff0ull},
    {65535LL * 256 + 1001, 42, (1ull << 40) + 3},
    {4099, 0xdeadbeefcafef00dull, UINT64_MAX - 4099 + 1},  // the very last counters
};

TEST(GpuRandom, UniformNormalAndDropoutMasksEqualTheCpuBitForBit) {
  LOOM_SKIP_WITHOUT_CUDA();
  for (const Draw& d : kDraws) {
    for (DType t : kFloatTypes) {
      const std::string what = std::string(dtype_name(t)) + " n=" + std::to_string(d.n) + " seed=" +
                               std::to_string(d.seed) + " offset=" + std::to_string(d.offset);
      expect_same_bits(random_uniform({d.n}, t, kCuda, d.seed, d.offset),
                       random_uniform({d.n}, t, Device::cpu(), d.seed, d.offset), "uniform " + what);
      expect_same_bits(random_normal({d.n}, t, kCuda, d.seed, d.offset),
                       random_normal({d.n}, t, Device::cpu(), d.seed, d.offset), "normal " + what);
      for (double p : {0.0, 0.1, 0.5, 0.875})
        expect_same_bits(random_dropout_mask({d.n}, t, kCuda, p, d.seed, d.offset),
                         random_dropout_mask({d.n}, t, Device::cpu(), p, d.seed, d.offset),
                         "dropout p=" + std::to_string(p) + " " + what);
    }
  }
}

TEST(GpuRandom, ShapesAndEmptyDraws) {
  LOOM_SKIP_WITHOUT_CUDA();
  const Tensor a = random_normal({3, 5, 7}, DType::F32, kCuda, 1, 2);
  EXPECT_EQ(a.shape(), (Shape{3, 5, 7}));
  EXPECT_TRUE(a.is_contiguous());
  expect_same_bits(a, random_normal({3, 5, 7}, DType::F32, Device::cpu(), 1, 2), "3-d normal");
  EXPECT_EQ(random_uniform({0}, DType::F32, kCuda, 1).numel(), 0);
}

// The dropout op on a CUDA tensor draws its mask on the device: the same output as on the CPU
// for the same generator seed, forward and backward.
TEST(GpuRandom, DropoutOnCudaMatchesTheCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  for (DType t : kFloatTypes) {
    SCOPED_TRACE(dtype_name(t));
    const Tensor x = random_normal({7, 301}, t, Device::cpu(), 3, 0);
    Generator g_cpu(99), g_gpu(99);
    Variable xc(x, true), xg(x.to(kCuda), true);
    const Variable yc = dropout(xc, 0.3, true, g_cpu);
    const Variable yg = dropout(xg, 0.3, true, g_gpu);
    expect_same_bits(yg.tensor(), yc.tensor(), "forward");
    sum(yc).backward();
    sum(yg).backward();
    expect_same_bits(xg.grad(), xc.grad(), "backward");
  }
}

// ---- loss scaling ------------------------------------------------------------------------------------

// 300 gradients (more than one launch of 256) of odd sizes, some larger than one chunk.
std::vector<Tensor> many_grads(DType t, uint64_t seed) {
  std::vector<Tensor> g;
  for (int i = 0; i < 300; ++i) {
    const int64_t n = i % 37 == 0 ? 4096 * 3 + 17 : 1 + (i * 97) % 613;
    g.push_back(ops::mul_scalar(random_normal({n}, DType::F64, Device::cpu(), seed, uint64_t(i) << 20), 1000.0).to(t));
  }
  return g;
}

std::vector<Tensor> to_cuda(const std::vector<Tensor>& ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(t.to(kCuda));
  return out;
}

TEST(GpuLossScaling, UnscaleEqualsTheCpuAndFindsEveryPlacedNonFinite) {
  LOOM_SKIP_WITHOUT_CUDA();
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (DType t : kFloatTypes) {
    // none; a nan in the first tensor; an inf in the last element of the 299th (second launch);
    // -inf in the middle of a multi-chunk tensor.
    struct Bad {
      int tensor;
      int64_t at;
      double value;
    };
    const std::vector<std::vector<Bad>> placements = {{}, {{0, 0, nan}}, {{299, -1, inf}}, {{37, 4096 + 5, -inf}}};
    for (size_t k = 0; k < placements.size(); ++k) {
      SCOPED_TRACE(std::string(dtype_name(t)) + " placement " + std::to_string(k));
      std::vector<Tensor> cpu = many_grads(t, 11 + k);
      for (const Bad& b : placements[k]) {
        Tensor& g = cpu[size_t(b.tensor)];
        g.narrow(0, b.at < 0 ? g.numel() - 1 : b.at, 1).fill_(b.value);
      }
      std::vector<Tensor> gpu = to_cuda(cpu);
      const Tensor found_cpu = Tensor::zeros({1}), found_gpu = Tensor::zeros({1}, DType::F32, kCuda);
      const double inv = 3.0 / 65536.0;
      ops::unscale_check_finite(cpu, found_cpu, inv);
      ops::unscale_check_finite(gpu, found_gpu, inv);
      EXPECT_EQ(found_gpu.item(), placements[k].empty() ? 0.0 : 1.0);
      EXPECT_EQ(found_gpu.item(), found_cpu.item());
      if (!placements[k].empty()) continue;  // values compared where all are finite (NaN ≠ NaN)
      for (size_t i = 0; i < cpu.size(); ++i) expect_same_bits(gpu[i], cpu[i], "tensor " + std::to_string(i));
    }
  }
}

TEST(GpuLossScaling, GradScalerOnCudaGradients) {
  LOOM_SKIP_WITHOUT_CUDA();
  optim::GradScaler s;
  Variable w(Tensor::from_values({1.5, -2.0, 0.25}, {3}, DType::F32, kCuda), true);
  s.scale_loss(sum(w * w)).backward();
  EXPECT_FALSE(s.unscale({w}));
  EXPECT_EQ(w.grad().to(Device::cpu()).to_vector(), (std::vector<double>{3.0, -4.0, 0.5}));
  w.set_grad(Tensor::from_values({1.0, std::numeric_limits<double>::infinity(), 0.0}, {3}, DType::F32, kCuda));
  EXPECT_TRUE(s.unscale({w}));
}

}  // namespace
}  // namespace loom
