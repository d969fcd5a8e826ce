// A Linear's GEMM, x·Wᵀ + b or x·Wᵀ, and x·B over problems sharing x (a convolution's product), on
// loom's own Hopper kernel (LOOM_GEMM_WGMMA = bias | all | conv;
// tensor/cuda/cuda_gemm_wgmma.cu) against the CPU in f64 on the same (rounded) inputs, at sizes
// that are no multiple of a tile: m leaving the last row tile part full, k below and past one
// k-step of 64, n leaving the last 256-column tile with a part-full second box (n = 136, 264,
// 1288) or none (n = 8, 640), A rows further apart than k (a narrowed x), C rows further apart
// than n (its padding must stay untouched), more tiles than SMs. Skips, with the reason, without
// a GPU; the kernel's cases skip where it does not run (no sm_90a build or device).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tensor/backend.h"
#include "tensor/conv.h"
#include "tensor/cuda/cuda_backend.h"
#include "tensor/ops.h"
#include "tests/common/fused_reference.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using loom::testing::any_error_of;
using loom::testing::max_abs_diff;
using loom::testing::rel_error;
using loom::testing::ScopedEnv;

const Device kCuda = Device::cuda(0);

struct BiasCase {
  int64_t m, k, n;
  int64_t lda_pad = 0, ldc_pad = 0;  // A's row stride k + lda_pad, C's n + ldc_pad
  bool bias = true;                  // without: LOOM_GEMM_WGMMA=all, n ≥ 128, k ≥ 64
};

const std::vector<BiasCase> kCases = {{300, 72, 136},         {128, 64, 8, 8, 6},       {1000, 640, 640},
                                      {4100, 320, 1288, 8},   {257, 1280, 264, 0, 8},   {129, 2560, 640},
                                      {300, 72, 136, 0, 0, false}, {1000, 640, 1288, 8, 8, false}};

// The operands on the GPU in the tested dtype (x a narrowed view when lda_pad > 0) and the same
// values in f64 on the CPU.
struct Operands {
  Tensor x, w, b, x64, w64, b64;
};

Operands operands(const BiasCase& c, DType dtype, Generator& gen) {
  Operands o;
  const Tensor x_wide = random_tensor({c.m, c.k + c.lda_pad}, gen, dtype, Device::cpu(), 0.0, 1.0);
  const Tensor w = random_tensor({c.n, c.k}, gen, dtype, Device::cpu(), 0.0, 1.0 / std::sqrt(double(c.k)));
  o.x = x_wide.to(kCuda).narrow(1, 0, c.k), o.w = w.to(kCuda);
  o.x64 = x_wide.narrow(1, 0, c.k).to(DType::F64), o.w64 = w.to(DType::F64);
  if (c.bias) {
    const Tensor b = random_tensor({c.n}, gen, dtype, Device::cpu(), 0.0, 0.5);
    o.b = b.to(kCuda), o.b64 = b.to(DType::F64);
  }
  return o;
}

// g for C [m, n] (row stride ldc) = x·wᵀ (+ b), C in `out` ([m, n + ldc_pad] on the GPU).
GemmBatch batch_of(const BiasCase& c, const Operands& o, const Tensor& out) {
  GemmBatch g;
  g.device = kCuda, g.dtype = o.x.dtype();
  g.trans_a = false, g.trans_b = true;
  g.m = c.m, g.n = c.n, g.k = c.k;
  g.a = o.x.raw_data(), g.lda = c.k + c.lda_pad;
  g.b = o.w.raw_data(), g.ldb = c.k;
  g.c = out.raw_data(), g.ldc = c.n + c.ldc_pad;
  g.bias = o.b.defined() ? o.b.raw_data() : nullptr;
  return g;
}

std::string name_of(const BiasCase& c, DType dtype) {
  return std::string(dtype_name(dtype)) + " m " + std::to_string(c.m) + " k " + std::to_string(c.k) + " n " +
         std::to_string(c.n) + " lda +" + std::to_string(c.lda_pad) + " ldc +" + std::to_string(c.ldc_pad) +
         (c.bias ? " bias" : " no bias");
}

double tol_for(DType dtype) { return dtype == DType::BF16 ? 8e-3 : 1.5e-3; }

constexpr double kSentinel = 7.0;  // C's padding columns hold it before and after

// Every case in bf16 and f16: the kernel takes it, its C matches x·wᵀ (+ b) in f64 with the error
// of one rounding (within 1.25× cuBLAS(Lt)'s on the same operands), C's padding is untouched.
TEST(GpuGemmWgmma, MatchesTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(0x6d62u ^ ::testing::UnitTest::GetInstance()->random_seed());
  for (DType dtype : {DType::BF16, DType::F16}) {
    for (const BiasCase& c : kCases) {
      const std::string what = name_of(c, dtype);
      const Operands o = operands(c, dtype, gen);
      Tensor out = Tensor::full({c.m, c.n + c.ldc_pad}, kSentinel, dtype, kCuda);
      {
        ScopedEnv on("LOOM_GEMM_WGMMA", c.bias ? "bias" : "all");
        if (!cuda_gemm_wgmma(batch_of(c, o, out))) GTEST_SKIP() << "no sm_90a GEMM kernel on this build or device";
      }
      const Tensor ref = ops::linear(o.x64, o.w64, o.b64);
      const Tensor got = out.to(Device::cpu()).to(DType::F64);
      const double err = rel_error(got.narrow(1, 0, c.n), ref);
      EXPECT_LE(err, tol_for(dtype)) << what;
      if (c.ldc_pad > 0) {
        const Tensor pad = got.narrow(1, c.n, c.ldc_pad);
        EXPECT_EQ(max_abs_diff(pad, Tensor::full(pad.shape(), kSentinel, DType::F64, Device::cpu())), 0.0) << what;
      }
      const Tensor lt = ops::linear(o.x, o.w, o.b).to(Device::cpu()).to(DType::F64);  // LOOM_GEMM_WGMMA unset
      EXPECT_LE(err, 1.25 * rel_error(lt, ref) + 1e-7) << what << ": against cuBLAS(Lt)'s";
    }
  }
}

// ops::linear takes the kernel, with a bias and without, under LOOM_GEMM_WGMMA=all (the backend's
// gemm asks it first): the same bits as the direct call.
TEST(GpuGemmWgmma, LinearRunsIt) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(0x6d63u ^ ::testing::UnitTest::GetInstance()->random_seed());
  ScopedEnv on("LOOM_GEMM_WGMMA", "all");
  for (const bool bias : {true, false}) {
    const BiasCase c{1000, 640, 640, 0, 0, bias};
    const Operands o = operands(c, DType::BF16, gen);
    const Tensor direct = Tensor::empty({c.m, c.n}, DType::BF16, kCuda);
    if (!cuda_gemm_wgmma(batch_of(c, o, direct))) GTEST_SKIP() << "no sm_90a GEMM kernel on this build or device";
    const Tensor via_linear = ops::linear(o.x, o.w, o.b);
    EXPECT_EQ(max_abs_diff(via_linear.to(Device::cpu()).to(DType::F64), direct.to(Device::cpu()).to(DType::F64)), 0.0)
        << name_of(c, DType::BF16);
  }
}

// B stored N-major (x·B, B [k, n] at row stride ldb), over `batch` problems sharing A with B's
// contiguous (a convolution's W·columns): LOOM_GEMM_WGMMA=conv.
struct NMajorCase {
  int64_t m, k, n, batch;
  int64_t ldb_pad = 0;  // batch 1 only
  bool bias = false;
};

const std::vector<NMajorCase> kNMajorCases = {
    {300, 128, 136, 1, 8}, {129, 64, 264, 2}, {1280, 192, 200, 1, 0, true}, {320, 576, 1024, 3}, {257, 72, 128, 1}};

// Every N-major case in bf16 and f16 against the CPU in f64 (each problem A·B[i] (+ b)).
TEST(GpuGemmWgmma, NMajorMatchesTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(0x6d65u ^ ::testing::UnitTest::GetInstance()->random_seed());
  ScopedEnv on("LOOM_GEMM_WGMMA", "conv");
  for (DType dtype : {DType::BF16, DType::F16}) {
    for (const NMajorCase& c : kNMajorCases) {
      const std::string what = std::string(dtype_name(dtype)) + " m " + std::to_string(c.m) + " k " +
                               std::to_string(c.k) + " n " + std::to_string(c.n) + " batch " +
                               std::to_string(c.batch) + " ldb +" + std::to_string(c.ldb_pad);
      const int64_t ldb = c.n + c.ldb_pad;
      const Tensor a = random_tensor({c.m, c.k}, gen, dtype, Device::cpu(), 0.0, 1.0);
      const Tensor b = random_tensor({c.batch, c.k, ldb}, gen, dtype, Device::cpu(), 0.0, 1.0 / std::sqrt(double(c.k)));
      const Tensor bias = c.bias ? random_tensor({c.n}, gen, dtype, Device::cpu(), 0.0, 0.5) : Tensor();
      const Tensor a_gpu = a.to(kCuda), b_gpu = b.to(kCuda), bias_gpu = c.bias ? bias.to(kCuda) : Tensor();
      const Tensor out = Tensor::empty({c.batch, c.m, c.n}, dtype, kCuda);
      GemmBatch g;
      g.device = kCuda, g.dtype = dtype;
      g.m = c.m, g.n = c.n, g.k = c.k, g.batch = c.batch;
      g.a = a_gpu.raw_data(), g.lda = c.k, g.stride_a = 0;
      g.b = b_gpu.raw_data(), g.ldb = ldb, g.stride_b = c.k * ldb;
      g.c = out.raw_data(), g.ldc = c.n, g.stride_c = c.m * c.n;
      g.bias = c.bias ? bias_gpu.raw_data() : nullptr;
      if (!cuda_gemm_wgmma(g)) GTEST_SKIP() << "no sm_90a GEMM kernel on this build or device";
      const Tensor a64 = a.to(DType::F64), b64 = b.to(DType::F64).narrow(2, 0, c.n);
      Tensor ref = ops::matmul(a64, b64);  // [batch, m, n]
      if (c.bias) ref = ops::add(ref, bias.to(DType::F64));
      EXPECT_LE(rel_error(out.to(Device::cpu()).to(DType::F64), ref), tol_for(dtype)) << what;
    }
  }
}

// ops::conv2d's im2col product (W [O, C·9] · columns [N, C·9, L], one GEMM over the samples)
// under LOOM_GEMM_WGMMA=conv against the CPU in f64.
TEST(GpuGemmWgmma, ConvolutionMatchesTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(0x6d66u ^ ::testing::UnitTest::GetInstance()->random_seed());
  const Tensor x = random_tensor({2, 64, 20, 24}, gen, DType::BF16, Device::cpu(), 0.0, 1.0);
  const Tensor w = random_tensor({128, 64, 3, 3}, gen, DType::BF16, Device::cpu(), 0.0, 1.0 / 24.0);
  const Tensor b = random_tensor({128}, gen, DType::BF16, Device::cpu(), 0.0, 0.5);
  const ops::Conv2dParams p{1, 1, 1, 1};
  const Tensor ref = ops::conv2d(x.to(DType::F64), w.to(DType::F64), b.to(DType::F64), p);
  ScopedEnv on("LOOM_GEMM_WGMMA", "conv");
  const Tensor y = ops::conv2d(x.to(kCuda), w.to(kCuda), b.to(kCuda), p);
  EXPECT_LE(rel_error(y.to(Device::cpu()).to(DType::F64), ref), tol_for(DType::BF16));
}

// What the kernel declines (the caller's cuBLAS / cuBLASLt path runs), and a bad LOOM_GEMM_WGMMA.
TEST(GpuGemmWgmma, DeclinesWhatDoesNotFit) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(0x6d64u ^ ::testing::UnitTest::GetInstance()->random_seed());
  const BiasCase c{300, 72, 136};
  const Operands o = operands(c, DType::BF16, gen);
  const Tensor out = Tensor::empty({c.m, c.n}, DType::BF16, kCuda);
  const GemmBatch g = batch_of(c, o, out);
  EXPECT_FALSE(cuda_gemm_wgmma(g)) << "LOOM_GEMM_WGMMA unset: cuBLASLt's";
  ScopedEnv on("LOOM_GEMM_WGMMA", "bias");
  if (!cuda_gemm_wgmma(g)) GTEST_SKIP() << "no sm_90a GEMM kernel on this build or device";
  auto declined = [&](const char* why, auto&& change) {
    GemmBatch h = g;
    change(h);
    EXPECT_FALSE(cuda_gemm_wgmma(h)) << why;
  };
  declined("m < 128", [](GemmBatch& h) { h.m = 100; });
  declined("n not a multiple of 8", [](GemmBatch& h) { h.n = 132; });
  declined("k not a multiple of 8", [](GemmBatch& h) { h.k = 68; });
  declined("B not transposed", [](GemmBatch& h) { h.trans_b = false; });
  declined("A transposed", [](GemmBatch& h) { h.trans_a = true; });
  declined("a batch of 2", [](GemmBatch& h) { h.batch = 2; });
  declined("beta 1", [](GemmBatch& h) { h.beta = 1.0; });
  declined("no bias under LOOM_GEMM_WGMMA=bias", [](GemmBatch& h) { h.bias = nullptr; });
  declined("f32", [](GemmBatch& h) { h.dtype = DType::F32; });
  {
    ScopedEnv all("LOOM_GEMM_WGMMA", "all");
    EXPECT_TRUE(cuda_gemm_wgmma(g)) << "with a bias under all";
    declined("no bias, n < 128", [](GemmBatch& h) { h.bias = nullptr, h.n = 120; });
    declined("no bias, k < 64", [](GemmBatch& h) { h.bias = nullptr, h.k = 56; });
  }
  declined("B N-major under LOOM_GEMM_WGMMA=bias", [](GemmBatch& h) { h.trans_b = false, h.ldb = h.n; });
  {
    ScopedEnv conv("LOOM_GEMM_WGMMA", "conv");
    auto batched = [&](GemmBatch& h) {
      h.trans_b = false, h.ldb = h.n, h.k = 128, h.batch = 2, h.stride_a = 0, h.stride_b = h.k * h.ldb;
      h.stride_c = h.m * h.ldc;
    };
    declined("batched, k not a multiple of 64", [&](GemmBatch& h) { batched(h), h.k = 72, h.stride_b = h.k * h.ldb; });
    declined("batched, A not shared", [&](GemmBatch& h) { batched(h), h.stride_a = h.m * h.lda; });
    declined("batched, B's problems apart", [&](GemmBatch& h) { batched(h), h.stride_b += 8; });
    declined("batched, B K-major", [&](GemmBatch& h) { batched(h), h.trans_b = true; });
  }
  ScopedEnv bad("LOOM_GEMM_WGMMA", "yes");
  EXPECT_THAT(any_error_of([&] { cuda_gemm_wgmma(g); }),
              ::testing::HasSubstr("LOOM_GEMM_WGMMA='yes' is not 0, bias, all or conv"));
}

}  // namespace
}  // namespace loom::test
