// The direct convolutions of CUDA bf16 / f16 against the CPU in f64 on fresh random inputs:
//
// The implicit-GEMM kernel (LOOM_CONV=igemm, tensor/cuda/cuda_conv_igemm.cu) at sizes that are no
// multiple of its 128 × 128 × 32 tile (odd N·oh·ow, O of 7 / 64 / 130, K = C·kh·kw of 5 … 2880,
// both its A paths: K % 8 == 0 through cp.async and not), kernels 1×1 / 3×3 / 5×5 / 2×3, stride 1
// and 2, padding 0 / 1 / 2, with and without bias: the forward and the stride-1 input gradient,
// each through the Backend slot itself and through ops::conv2d / conv2d_input_grad (the
// dispatch; the two must agree bit for bit). The library convolution (LOOM_CONV=cudnn,
// tensor/cuda/cuda_conv_cudnn.cu, where the build has cuDNN) on the same cases: the forward and
// both gradients at every stride.
// The reference is the f64 result on the same bf16 / f16-rounded inputs; the error (max |Δ| over
// max |ref|) must be at most 2× that of the im2col + cuBLAS path (LOOM_CONV=im2col) on the same
// inputs, plus a small floor, and below 1e-2 (bf16) / 2e-3 (f16). ctest -L gpu; skips without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <ostream>
#include <string>
#include <vector>

#include "tensor/backend.h"
#include "tensor/conv.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using loom::testing::error_of;
using loom::testing::max_abs_diff;
using loom::testing::max_rel_error;
using loom::testing::ScopedEnv;

struct Case {
  int64_t n, c, o, h, w, kh, kw, stride, pad_h, pad_w;
  bool bias;
  ops::Conv2dParams params() const { return ops::Conv2dParams{stride, stride, pad_h, pad_w}; }
  bool input_grad_direct() const { return stride == 1 && pad_h <= kh - 1 && pad_w <= kw - 1; }
};

void PrintTo(const Case& k, std::ostream* os) {
  *os << "x [" << k.n << ", " << k.c << ", " << k.h << ", " << k.w << "], w [" << k.o << ", " << k.c << ", " << k.kh
      << ", " << k.kw << "], stride " << k.stride << ", padding " << k.pad_h << "," << k.pad_w
      << (k.bias ? ", bias" : ", no bias");
}

double tolerance(DType dt) { return dt == DType::BF16 ? 1e-2 : 2e-3; }

// The inputs, drawn in f64 and rounded to dt: on the CPU in f64 (the reference's) and on the GPU in dt.
struct Inputs {
  Tensor x64, w64, b64, x, w, b;
};
Inputs make_inputs(const Case& k, DType dt, Generator& gen) {
  Inputs in;
  in.x64 = Tensor::randn({k.n, k.c, k.h, k.w}, gen, DType::F64).to(dt).to(DType::F64);
  in.w64 = Tensor::randn({k.o, k.c, k.kh, k.kw}, gen, DType::F64).to(dt).to(DType::F64);
  if (k.bias) in.b64 = Tensor::randn({k.o}, gen, DType::F64).to(dt).to(DType::F64);
  in.x = in.x64.to(dt).to(Device::cuda(0));
  in.w = in.w64.to(dt).to(Device::cuda(0));
  if (k.bias) in.b = in.b64.to(dt).to(Device::cuda(0));
  return in;
}

// A random output gradient for case k (drawn after make_inputs, from the same generator), rounded
// to dt: in f64 on the CPU and in dt on the GPU, with the geometry it has.
struct OutputGrad {
  Im2ColArgs geo;
  Tensor dy64, dy;
};
OutputGrad make_output_grad(const Case& k, const Inputs& in, DType dt, Generator& gen) {
  OutputGrad g;
  g.geo = ops::conv2d_geometry(in.x.shape(), k.kh, k.kw, k.params());
  g.dy64 = Tensor::randn({k.n, k.o, g.geo.out_h, g.geo.out_w}, gen, DType::F64).to(dt).to(DType::F64);
  g.dy = g.dy64.to(dt).to(Device::cuda(0));
  return g;
}

class ConvImplicitGemm : public ::testing::TestWithParam<Case> {};

TEST_P(ConvImplicitGemm, ForwardMatchesCpuF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  const Case k = GetParam();
  ScopedEnv direct("LOOM_CONV", "igemm");
  for (DType dt : {DType::BF16, DType::F16}) {
    SCOPED_TRACE(dtype_name(dt));
    Generator gen(::testing::UnitTest::GetInstance()->random_seed() + 11);
    const Inputs in = make_inputs(k, dt, gen);
    const Tensor ref = ops::conv2d(in.x64, in.w64, in.b64, k.params());

    Conv2dArgs a;
    a.x = in.x, a.w = in.w, a.bias = in.b;
    a.geo = ops::conv2d_geometry(in.x.shape(), k.kh, k.kw, k.params());
    a.y = Tensor::empty(ref.shape(), dt, Device::cuda(0));
    ASSERT_TRUE(backend_for(Device::cuda(0)).supports(OpKind::Conv2d, dt));
    backend_for(Device::cuda(0)).conv2d(a);

    const Tensor via_ops = ops::conv2d(in.x, in.w, in.b, k.params());
    Tensor im2col;
    {
      ScopedEnv old_path("LOOM_CONV", "im2col");
      im2col = ops::conv2d(in.x, in.w, in.b, k.params());
    }
    const double err = max_rel_error(a.y, ref), err_im2col = max_rel_error(im2col, ref);
    EXPECT_LE(err, 2 * err_im2col + 1e-4) << "implicit GEMM " << err << ", im2col + cuBLAS " << err_im2col;
    EXPECT_LE(err, tolerance(dt));
    EXPECT_EQ(max_abs_diff(via_ops, a.y), 0.0) << "ops::conv2d did not take the implicit-GEMM kernel";
  }
}

TEST_P(ConvImplicitGemm, InputGradientMatchesCpuF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  const Case k = GetParam();
  if (!k.input_grad_direct()) GTEST_SKIP() << "stride 2 / padding ≥ kernel: the input gradient keeps GEMM + col2im";
  ScopedEnv direct("LOOM_CONV", "igemm");
  for (DType dt : {DType::BF16, DType::F16}) {
    SCOPED_TRACE(dtype_name(dt));
    Generator gen(::testing::UnitTest::GetInstance()->random_seed() + 23);
    const Inputs in = make_inputs(k, dt, gen);
    const OutputGrad og = make_output_grad(k, in, dt, gen);
    const Im2ColArgs& geo = og.geo;
    const Tensor &dy64 = og.dy64, &dy = og.dy;
    const Tensor ref = ops::conv2d_input_grad(dy64, in.w64, in.x64.shape(), k.params());

    Conv2dInputGradArgs a;
    a.dy = dy, a.w = in.w, a.geo = geo;
    a.dx = Tensor::empty(in.x.shape(), dt, Device::cuda(0));
    backend_for(Device::cuda(0)).conv2d_input_grad(a);

    const Tensor via_ops = ops::conv2d_input_grad(dy, in.w, in.x.shape(), k.params());
    Tensor col2im;
    {
      ScopedEnv old_path("LOOM_CONV", "im2col");
      col2im = ops::conv2d_input_grad(dy, in.w, in.x.shape(), k.params());
    }
    const double err = max_rel_error(a.dx, ref), err_col2im = max_rel_error(col2im, ref);
    EXPECT_LE(err, 2 * err_col2im + 1e-4) << "implicit GEMM " << err << ", cuBLAS + col2im " << err_col2im;
    EXPECT_LE(err, tolerance(dt));
    EXPECT_EQ(max_abs_diff(via_ops, a.dx), 0.0) << "ops::conv2d_input_grad did not take the implicit-GEMM kernel";
  }
}

// Sizes that are no multiple of the implicit GEMM's tile (module comment); cuDNN runs them too.
const std::vector<Case> kOddCases = {
    Case{3, 5, 7, 9, 11, 3, 3, 1, 1, 1, true},       // K = 45: A by plain loads
    Case{3, 5, 7, 9, 11, 3, 3, 2, 1, 1, false},      // stride 2
    Case{3, 37, 64, 33, 17, 3, 3, 1, 1, 1, true},    // K = 333
    Case{3, 37, 64, 33, 17, 3, 3, 2, 0, 0, true},    // stride 2, no padding
    Case{3, 320, 64, 9, 11, 3, 3, 1, 1, 1, true},    // K = 2880: A through cp.async
    Case{3, 320, 64, 33, 17, 3, 3, 2, 1, 1, false},  // SD's Downsample2D shape
    Case{3, 320, 7, 33, 17, 1, 1, 1, 0, 0, true},    // pointwise, cp.async A
    Case{3, 5, 64, 33, 17, 1, 1, 1, 0, 0, false},    // pointwise, K = 5
    Case{3, 37, 7, 9, 11, 1, 1, 2, 0, 0, true},      // pointwise, stride 2
    Case{1, 8, 24, 7, 5, 1, 1, 1, 1, 1, true},       // pointwise with padding
    Case{3, 37, 130, 9, 11, 3, 3, 1, 0, 0, true},    // O over one tile; backward pad 2
    Case{2, 4, 320, 16, 16, 3, 3, 1, 1, 1, true},    // conv_in: C = 4, K = 36
    Case{2, 16, 9, 13, 10, 5, 5, 1, 2, 2, true},     // 5×5, K = 400
    Case{2, 6, 5, 9, 7, 2, 3, 1, 1, 0, true},       // 2×3, padding (1, 0)
};

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  const Case& k = info.param;
  return "n" + std::to_string(k.n) + "_c" + std::to_string(k.c) + "_o" + std::to_string(k.o) + "_" +
         std::to_string(k.h) + "x" + std::to_string(k.w) + "_k" + std::to_string(k.kh) + "x" + std::to_string(k.kw) +
         "_s" + std::to_string(k.stride) + "_p" + std::to_string(k.pad_h) + std::to_string(k.pad_w) +
         (k.bias ? "_bias" : "");
}

INSTANTIATE_TEST_SUITE_P(OddSizes, ConvImplicitGemm, ::testing::ValuesIn(kOddCases), case_name);

// ---- the library convolution (LOOM_CONV=cudnn: Backend::library_conv2d*, cuDNN) ----

bool has_library(DType dt) { return backend_for(Device::cuda(0)).supports(OpKind::Conv2dLibrary, dt); }

class ConvLibrary : public ::testing::TestWithParam<Case> {};

// The forward and both gradients at every stride and padding, through the slots and through ops::
// (which must take them: equal bit for bit for y and dx), against f64 on the same rounded inputs,
// each at most 2× as far as the im2col + cuBLAS path's, plus a floor. The default path (auto)
// must be im2col's forward and, for k×k kernels, the library's input gradient, bit for bit.
TEST_P(ConvLibrary, ForwardAndBothGradientsMatchCpuF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  if (!has_library(DType::BF16)) GTEST_SKIP() << "this build or device has no cuDNN";
  const Case k = GetParam();
  ScopedEnv library("LOOM_CONV", "cudnn");
  Backend& be = backend_for(Device::cuda(0));
  for (DType dt : {DType::BF16, DType::F16}) {
    SCOPED_TRACE(dtype_name(dt));
    Generator gen(::testing::UnitTest::GetInstance()->random_seed() + 31);
    const Inputs in = make_inputs(k, dt, gen);
    const OutputGrad og = make_output_grad(k, in, dt, gen);
    const Im2ColArgs& geo = og.geo;
    const Tensor &dy64 = og.dy64, &dy = og.dy;
    const Tensor y_ref = ops::conv2d(in.x64, in.w64, in.b64, k.params());
    const Tensor dx_ref = ops::conv2d_input_grad(dy64, in.w64, in.x64.shape(), k.params());
    const Tensor dw_ref = ops::conv2d_weight_grad(dy64, in.x64, in.w64.shape(), k.params());

    Conv2dArgs f;
    f.x = in.x, f.w = in.w, f.bias = in.b, f.geo = geo;
    f.y = Tensor::empty(y_ref.shape(), dt, Device::cuda(0));
    be.library_conv2d(f);
    Conv2dInputGradArgs gi;
    gi.dy = dy, gi.w = in.w, gi.geo = geo;
    gi.dx = Tensor::empty(in.x.shape(), dt, Device::cuda(0));
    be.library_conv2d_input_grad(gi);
    Conv2dWeightGradArgs gw;
    gw.dy = dy, gw.x = in.x, gw.geo = geo;
    gw.dw = Tensor::empty(in.w.shape(), dt, Device::cuda(0));
    be.library_conv2d_weight_grad(gw);

    EXPECT_EQ(max_abs_diff(ops::conv2d(in.x, in.w, in.b, k.params()), f.y), 0.0) << "ops::conv2d";
    EXPECT_EQ(max_abs_diff(ops::conv2d_input_grad(dy, in.w, in.x.shape(), k.params()), gi.dx), 0.0)
        << "ops::conv2d_input_grad";
    const double dw_ops = max_rel_error(ops::conv2d_weight_grad(dy, in.x, in.w.shape(), k.params()), dw_ref);
    Tensor y_im2col, dx_im2col, dw_im2col;
    {
      ScopedEnv old_path("LOOM_CONV", "im2col");
      y_im2col = ops::conv2d(in.x, in.w, in.b, k.params());
      dx_im2col = ops::conv2d_input_grad(dy, in.w, in.x.shape(), k.params());
      dw_im2col = ops::conv2d_weight_grad(dy, in.x, in.w.shape(), k.params());
    }
    {  // the default (LOOM_CONV=auto): im2col's forward, the library's gradients where k > 1
      ScopedEnv auto_path("LOOM_CONV", "auto");
      const bool kxk = k.kh > 1 || k.kw > 1;
      EXPECT_EQ(max_abs_diff(ops::conv2d(in.x, in.w, in.b, k.params()), y_im2col), 0.0) << "auto forward";
      EXPECT_EQ(max_abs_diff(ops::conv2d_input_grad(dy, in.w, in.x.shape(), k.params()), kxk ? gi.dx : dx_im2col),
                0.0)
          << "auto input gradient";
      const Tensor dw_auto = ops::conv2d_weight_grad(dy, in.x, in.w.shape(), k.params());
      if (!kxk) {
        EXPECT_EQ(max_abs_diff(dw_auto, dw_im2col), 0.0) << "auto weight gradient (1×1: GEMM)";
      }
      EXPECT_LE(max_rel_error(dw_auto, dw_ref), 2 * max_rel_error(dw_im2col, dw_ref) + 1e-4) << "auto weight gradient";
    }
    const double floor = 1e-4;
    const double y_err = max_rel_error(f.y, y_ref), dx_err = max_rel_error(gi.dx, dx_ref), dw_err = max_rel_error(gw.dw, dw_ref);
    EXPECT_LE(y_err, 2 * max_rel_error(y_im2col, y_ref) + floor) << "forward";
    EXPECT_LE(dx_err, 2 * max_rel_error(dx_im2col, dx_ref) + floor) << "input gradient";
    EXPECT_LE(dw_err, 2 * max_rel_error(dw_im2col, dw_ref) + floor) << "weight gradient";
    EXPECT_LE(dw_ops, 2 * max_rel_error(dw_im2col, dw_ref) + floor) << "weight gradient through ops::";
    for (double e : {y_err, dx_err, dw_err}) EXPECT_LE(e, tolerance(dt));
  }
}

INSTANTIATE_TEST_SUITE_P(OddSizes, ConvLibrary, ::testing::ValuesIn(kOddCases), case_name);

// LOOM_CONV=cudnn keeps f32 on the exact im2col path; a misspelt LOOM_CONV is an error naming it.
TEST(ConvLibraryChoice, F32StaysExactAndUnknownNamesFail) {
  LOOM_SKIP_WITHOUT_CUDA();
  const Device dev = Device::cuda(0);
  Generator gen(5);
  const Tensor x = Tensor::randn({2, 3, 9, 7}, gen, DType::F32, dev), w = Tensor::randn({4, 3, 3, 3}, gen, DType::F32, dev);
  const ops::Conv2dParams p{1, 1, 1, 1};
  Tensor lib, plain;
  {
    ScopedEnv library("LOOM_CONV", "cudnn");
    if (!has_library(DType::BF16)) {
      EXPECT_NE(error_of([&] { ops::conv2d(x.to(DType::BF16), w.to(DType::BF16), Tensor(), p); }).find("cuDNN"),
                std::string::npos);
    }
    lib = ops::conv2d(x, w, Tensor(), p);
  }
  {
    ScopedEnv old_path("LOOM_CONV", "im2col");
    plain = ops::conv2d(x, w, Tensor(), p);
  }
  EXPECT_EQ(max_abs_diff(lib, plain), 0.0);
  ScopedEnv bad("LOOM_CONV", "cudnnn");
  EXPECT_NE(error_of([&] { ops::conv2d(x, w, Tensor(), p); }).find("LOOM_CONV='cudnnn' is not auto, im2col, igemm or cudnn"),
            std::string::npos);
}

// The slots refuse what the kernel does not do, naming it; ops:: then never calls them (the
// input gradient for stride 2 above goes through GEMM + col2im).
TEST(ConvImplicitGemmLimits, RefusesStride2InputGradientDilationLargeKernelsAndF32) {
  LOOM_SKIP_WITHOUT_CUDA();
  const Device dev = Device::cuda(0);
  Backend& be = backend_for(dev);
  Conv2dInputGradArgs g;
  g.w = Tensor::zeros({4, 3, 3, 3}, DType::BF16, dev);
  g.geo = ops::conv2d_geometry({2, 3, 8, 8}, 3, 3, ops::Conv2dParams{2, 2, 1, 1});
  g.dy = Tensor::zeros({2, 4, g.geo.out_h, g.geo.out_w}, DType::BF16, dev);
  g.dx = Tensor::empty({2, 3, 8, 8}, DType::BF16, dev);
  EXPECT_NE(error_of([&] { be.conv2d_input_grad(g); }).find("stride 2,2"), std::string::npos);

  Conv2dArgs f;
  f.x = Tensor::zeros({2, 3, 8, 8}, DType::BF16, dev);
  f.w = g.w;
  f.geo = ops::conv2d_geometry(f.x.shape(), 3, 3, ops::Conv2dParams{1, 1, 1, 1});
  f.y = Tensor::empty({2, 4, 8, 8}, DType::BF16, dev);
  f.geo.dilation_h = 2;
  EXPECT_NE(error_of([&] { be.conv2d(f); }).find("dilation 2,1"), std::string::npos);
  // a kernel side over kConv2dMaxKernel: the slot refuses, ops::conv2d takes im2col + GEMM
  Conv2dArgs big;
  big.x = Tensor::ones({1, 1, 40, 3}, DType::BF16, dev);
  big.w = Tensor::ones({1, 1, 33, 1}, DType::BF16, dev);
  big.geo = ops::conv2d_geometry(big.x.shape(), 33, 1, ops::Conv2dParams{});
  big.y = Tensor::empty({1, 1, 8, 3}, DType::BF16, dev);
  EXPECT_NE(error_of([&] { be.conv2d(big); }).find("larger than 32x32"), std::string::npos);
  const Tensor y = ops::conv2d(big.x, big.w, Tensor(), ops::Conv2dParams{});
  EXPECT_EQ(y.to(Device::cpu()).to(DType::F64).to_vector(), std::vector<double>(24, 33.0));
  EXPECT_FALSE(be.supports(OpKind::Conv2d, DType::F32));
  EXPECT_FALSE(backend_for(Device::cpu()).supports(OpKind::Conv2d, DType::BF16));
}

}  // namespace
}  // namespace loom::test
