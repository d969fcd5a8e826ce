// A Linear's GEMM, x·Wᵀ + b or x·Wᵀ, on loom's own Hopper kernel (LOOM_GEMM_WGMMA = bias | all;
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
  ScopedEnv bad("LOOM_GEMM_WGMMA", "yes");
  EXPECT_THAT(any_error_of([&] { cuda_gemm_wgmma(g); }),
              ::testing::HasSubstr("LOOM_GEMM_WGMMA='yes' is not 0, bias or all"));
}

}  // namespace
}  // namespace loom::test
