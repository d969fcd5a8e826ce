// The group norm applied inside a convolution's columns (ops::conv2d_normed, CUDA's
// im2col_normed kernels) against the composition it replaces — group_norm, then conv2d — on the
// GPU in the same dtype and on the CPU in f64, at odd sizes, with and without a shift and the
// norm's affine parameters; group_norm_statistics against group_norm's own statistics; bias GEMMs
// with algorithms timed (LOOM_GEMM_TUNE) against the CPU. ctest -L gpu.
#include <gtest/gtest.h>

#include <string>

#include "tensor/conv.h"
#include "tensor/ops.h"
#include "tensor/ops_fused.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using loom::testing::max_rel_error;
using loom::testing::ScopedEnv;

struct NormedCase {
  Shape x, w;
  int64_t groups, stride, pad;
};

void PrintTo(const NormedCase& c, std::ostream* os) {
  *os << "x " << ::testing::PrintToString(c.x) << ", w " << ::testing::PrintToString(c.w) << ", groups "
      << c.groups << ", stride " << c.stride << ", padding " << c.pad;
}

class GpuConvNormed : public ::testing::TestWithParam<NormedCase> {};

double tolerance(DType dt) { return dt == DType::F64 ? 1e-12 : dt == DType::F32 ? 1e-5 : 3e-2; }

TEST_P(GpuConvNormed, EqualsTheNormThenTheConvolution) {
  LOOM_SKIP_WITHOUT_CUDA();
  const NormedCase c = GetParam();
  Generator gen(::testing::UnitTest::GetInstance()->random_seed() + 11);
  const int64_t N = c.x[0], C = c.x[1];
  const Tensor x = ops::add_scalar(ops::mul_scalar(Tensor::randn(c.x, gen, DType::F64), 2.0), 0.5), w = Tensor::randn(c.w, gen, DType::F64);
  const Tensor b = Tensor::randn({c.w[0]}, gen, DType::F64), gamma = Tensor::randn({C}, gen, DType::F64);
  const Tensor beta = Tensor::randn({C}, gen, DType::F64), shift = Tensor::randn({N, C}, gen, DType::F64);
  const ops::Conv2dParams p{c.stride, c.stride, c.pad, c.pad};
  for (DType dt : {DType::BF16, DType::F16, DType::F32, DType::F64})
    for (bool with_shift : {false, true})
      for (bool affine : {false, true}) {
        const std::string what = std::string(dtype_name(dt)) + (with_shift ? ", shift" : "") + (affine ? ", affine" : "");
        auto on = [&](const Tensor& t, Device dev, DType d) { return t.defined() ? t.to(d).to(dev) : Tensor(); };
        auto norm_on = [&](Device dev, DType d) {
          ops::GroupNormBeforeConv n;
          n.groups = c.groups, n.eps = 1e-5, n.silu = true;
          if (affine) n.weight = on(gamma, dev, d), n.bias = on(beta, dev, d);
          if (with_shift) n.shift = on(shift, dev, d);
          return n;
        };
        auto composed = [&](Device dev, DType d) {
          const ops::GroupNormBeforeConv n = norm_on(dev, d);
          const Tensor h = ops::group_norm(on(x, dev, d), n.groups, n.weight, n.bias, n.eps, true, n.shift).y;
          return ops::conv2d(h, on(w, dev, d), on(b, dev, d), p);
        };
        const Device gpu = Device::cuda(0);
        const Tensor fused = ops::conv2d_normed(on(x, gpu, dt), norm_on(gpu, dt), on(w, gpu, dt), on(b, gpu, dt), p);
        const Tensor gpu_ref = composed(gpu, dt), cpu_ref = composed(Device::cpu(), DType::F64);
        ASSERT_EQ(fused.shape(), cpu_ref.shape()) << what;
        // The same normed values and the same GEMM: equal up to the FMA contraction of the norm.
        EXPECT_LE(max_rel_error(fused.to(DType::F64), gpu_ref.to(DType::F64)),
                  dt == DType::F64 ? 1e-14 : dt == DType::F32 ? 1e-6 : 1e-2)
            << what;
        EXPECT_LE(max_rel_error(fused.to(DType::F64), cpu_ref), tolerance(dt)) << what;
        {
          ScopedEnv off("LOOM_CONV_NORMED", "0");  // the composition, through the same entry point
          const Tensor plain =
              ops::conv2d_normed(on(x, gpu, dt), norm_on(gpu, dt), on(w, gpu, dt), on(b, gpu, dt), p);
          EXPECT_EQ(max_rel_error(plain.to(DType::F64), gpu_ref.to(DType::F64)), 0.0) << what;
        }
      }
}

// 3×3 at stride 1 and padding 1 with the width a multiple of 8 takes the 16-byte kernel (bf16 /
// f16); the others the general one.
INSTANTIATE_TEST_SUITE_P(OddSizes, GpuConvNormed,
                         ::testing::Values(NormedCase{{2, 6, 9, 16}, {5, 6, 3, 3}, 3, 1, 1},
                                           NormedCase{{3, 4, 7, 11}, {7, 4, 3, 3}, 2, 1, 1},
                                           NormedCase{{2, 6, 9, 10}, {3, 6, 3, 3}, 6, 2, 1},
                                           NormedCase{{1, 8, 12, 13}, {4, 8, 5, 5}, 4, 1, 2},
                                           NormedCase{{2, 10, 5, 24}, {9, 10, 3, 3}, 5, 1, 1}));

TEST(GpuConvNormed, ChunkedColumnsEqualOneChunk) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(::testing::UnitTest::GetInstance()->random_seed() + 12);
  const Device gpu = Device::cuda(0);
  const Tensor x = Tensor::randn({5, 8, 10, 16}, gen, DType::F32).to(gpu);
  const Tensor w = Tensor::randn({6, 8, 3, 3}, gen, DType::F32).to(gpu);
  ops::GroupNormBeforeConv n;
  n.groups = 4, n.silu = true, n.shift = Tensor::randn({5, 8}, gen, DType::F32).to(gpu);
  const Tensor whole = ops::conv2d_normed(x, n, w, Tensor(), {1, 1, 1, 1});
  ScopedEnv budget("LOOM_CONV_COLUMN_BYTES", "12000");  // two samples' columns at a time, one in the last
  const Tensor chunked = ops::conv2d_normed(x, n, w, Tensor(), {1, 1, 1, 1});
  // the same columns; cuBLAS may pick another kernel for a batch of 2 than for 5 (measured 2.6e-7)
  EXPECT_LE(max_rel_error(chunked, whole), 2e-6);
}

TEST(GpuConvNormed, StatisticsAreTheGroupNormsOwn) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(::testing::UnitTest::GetInstance()->random_seed() + 13);
  for (DType dt : {DType::BF16, DType::F32, DType::F64}) {
    const Tensor x = Tensor::randn({3, 12, 7, 9}, gen, DType::F64).to(dt).to(Device::cuda(0));
    const Tensor shift = Tensor::randn({3, 12}, gen, DType::F64).to(dt).to(Device::cuda(0));
    const ops::NormForward full = ops::group_norm(x, 4, Tensor(), Tensor(), 1e-6, false, shift);
    const ops::NormForward stats = ops::group_norm_statistics(x, 4, 1e-6, shift);
    EXPECT_FALSE(stats.y.defined());
    EXPECT_EQ(max_rel_error(stats.mean, full.mean), 0.0) << dtype_name(dt);
    EXPECT_EQ(max_rel_error(stats.rstd, full.rstd), 0.0) << dtype_name(dt);
  }
}

// Linear layers' GEMMs with the bias epilogue (cuBLASLt), with the heuristic's first algorithm and
// with the fastest of four timed when the plan is made (LOOM_GEMM_TUNE), against the CPU in f64: a
// batch of rows, sizes that are not multiples of a tile.
TEST(GpuGemmLt, TunedBiasGemmsMatchTheCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(::testing::UnitTest::GetInstance()->random_seed() + 14);
  const Tensor x = Tensor::randn({3, 77, 45}, gen, DType::F64), w = Tensor::randn({133, 45}, gen, DType::F64);
  const Tensor b = Tensor::randn({133}, gen, DType::F64);
  const Tensor ref = ops::linear(x, w, b);
  for (const char* tune : {"1", "4"}) {
    ScopedEnv tuned("LOOM_GEMM_TUNE", tune);
    for (DType dt : {DType::BF16, DType::F16}) {
      const Device gpu = Device::cuda(0);
      const Tensor y = ops::linear(x.to(dt).to(gpu), w.to(dt).to(gpu), b.to(dt).to(gpu));
      EXPECT_LE(max_rel_error(y.to(DType::F64), ref), 2e-2) << dtype_name(dt) << " tune " << tune;
    }
  }
}

}  // namespace
}  // namespace loom::test
