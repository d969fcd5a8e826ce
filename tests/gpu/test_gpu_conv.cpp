// CUDA conv2d (im2col / col2im kernels + cuBLAS) against the CPU in f64 at odd
// sizes, forward and all three gradients (ctest -L gpu). Skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "autograd/ops.h"
#include "tensor/backend.h"
#include "tensor/conv.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using loom::testing::max_rel_error;

struct Geo {
  Shape x, w;
  int64_t stride, pad;
};

void PrintTo(const Geo& g, std::ostream* os) {
  *os << "x " << ::testing::PrintToString(g.x) << ", w " << ::testing::PrintToString(g.w) << ", stride " << g.stride
      << ", padding " << g.pad;
}

class GpuConv : public ::testing::TestWithParam<Geo> {};

TEST_P(GpuConv, MatchesCpuF64ForwardAndBackward) {
  LOOM_SKIP_WITHOUT_CUDA();
  const Geo g = GetParam();
  for (DType dtype : {DType::F64, DType::F32}) {
    Generator gen(::testing::UnitTest::GetInstance()->random_seed() + 3);
    const Tensor x = Tensor::randn(g.x, gen, DType::F64), w = Tensor::randn(g.w, gen, DType::F64);
    const Tensor b = Tensor::randn({g.w[0]}, gen, DType::F64);
    auto run = [&](Device dev, DType dt, Tensor& y, Tensor& up, std::vector<Tensor>& grads) {
      Variable vx(x.to(dt).to(dev), true), vw(w.to(dt).to(dev), true), vb(b.to(dt).to(dev), true);
      const Variable out = conv2d(vx, vw, vb, g.stride, g.pad);
      if (!up.defined()) up = Tensor::randn(out.shape(), gen, DType::F64);
      out.backward(up.to(dt).to(dev));
      y = out.tensor();
      grads = {vx.grad(), vw.grad(), vb.grad()};
    };
    Tensor y_ref, y_gpu, up;
    std::vector<Tensor> g_ref, g_gpu;
    run(Device::cpu(), DType::F64, y_ref, up, g_ref);
    run(Device::cuda(0), dtype, y_gpu, up, g_gpu);
    const double tol = dtype == DType::F64 ? 1e-12 : 1e-5;
    EXPECT_LE(max_rel_error(y_gpu, y_ref), tol) << "forward " << dtype_name(dtype);
    for (size_t i = 0; i < 3; ++i)
      EXPECT_LE(max_rel_error(g_gpu[i], g_ref[i]), tol) << "gradient " << i << " " << dtype_name(dtype);
  }
}

INSTANTIATE_TEST_SUITE_P(OddSizes, GpuConv,
                         ::testing::Values(Geo{{3, 5, 13, 11}, {7, 5, 3, 3}, 1, 1},
                                           Geo{{2, 6, 17, 9}, {5, 6, 3, 3}, 2, 1},
                                           Geo{{1, 3, 10, 7}, {4, 3, 1, 1}, 1, 0},
                                           Geo{{2, 3, 9, 9}, {2, 3, 5, 5}, 3, 2},
                                           Geo{{2, 3, 9, 16}, {4, 3, 3, 3}, 1, 1},     // out_w 16: packed im2col
                                           Geo{{1, 2, 7, 16}, {3, 2, 3, 3}, 2, 1}),    // out_w 8, stride 2
                         [](const ::testing::TestParamInfo<Geo>& info) {
                           const Geo& g = info.param;
                           return "x" + std::to_string(g.x[2]) + "x" + std::to_string(g.x[3]) + "_k" +
                                  std::to_string(g.w[2]) + "_s" + std::to_string(g.stride) + "_p" +
                                  std::to_string(g.pad);
                         });

// im2col is a copy: CUDA's columns equal the CPU's bit for bit in every dtype, on the 16-byte pack
// path (out_w a multiple of the pack: 8 for bf16 / f16, 4 for f32, 2 for f64), the scalar one, and
// the 3×3 / stride 1 / padding 1 kernel (width a multiple of the pack: one, two and three packs a
// row, so that the first, the last and an inner pack take their neighbours; one image row).
TEST(GpuIm2col, EqualsTheCpuExactlyInEveryDtype) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(31);
  struct Case { Shape x; int64_t k, stride, pad; };
  for (const Case& c : {Case{{2, 3, 9, 16}, 3, 1, 1}, Case{{1, 5, 17, 32}, 3, 2, 1}, Case{{3, 2, 6, 8}, 1, 1, 0},
                        Case{{2, 4, 5, 7}, 3, 1, 1}, Case{{1, 3, 8, 24}, 5, 1, 2},
                        Case{{1, 3, 5, 24}, 3, 1, 1}, Case{{2, 2, 3, 8}, 3, 1, 1}, Case{{1, 2, 1, 8}, 3, 1, 1}}) {
    for (DType dtype : {DType::BF16, DType::F16, DType::F32, DType::F64}) {
      SCOPED_TRACE(::testing::PrintToString(c.x) + " k" + std::to_string(c.k) + " " + dtype_name(dtype));
      const Tensor x = Tensor::randn(c.x, gen, DType::F64).to(dtype);
      ops::Conv2dParams p;
      p.stride_h = p.stride_w = c.stride, p.pad_h = p.pad_w = c.pad;
      const Im2ColArgs g = ops::conv2d_geometry(x.shape(), c.k, c.k, p);
      const Tensor cpu = ops::im2col(x, g), gpu = ops::im2col(x.to(Device::cuda(0)), g).to(Device::cpu());
      EXPECT_EQ(gpu.to_vector(), cpu.to_vector());
    }
  }
}

}  // namespace
}  // namespace loom::test
