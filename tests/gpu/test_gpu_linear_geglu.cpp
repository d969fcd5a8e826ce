// ops::linear_geglu on CUDA (ctest -L gpu): the Hopper kernel that computes a Linear and GEGLU as
// one product (tensor/cuda/cuda_gemm_wgmma.cu) and the composed fallback, against the CPU in f64
// on the same (rounded) inputs, at sizes that are no multiple of a tile: rows of a part-full row
// tile, `in` below and past one k-step of 64, h leaving the last column tile part full (its hidden
// box then reads gate rows), more tiles than SMs (persistent blocks, the stage ring wrapping).
// Skips, with the reason, without a GPU; the kernel's own cases skip where it does not run.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tensor/backend.h"
#include "tensor/ops.h"
#include "tensor/ops_fused.h"
#include "tests/common/fused_reference.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using loom::testing::any_error_of;
using loom::testing::ScopedEnv;

const Device kCuda = Device::cuda(0);

struct GegluCase {
  int64_t rows, in, h;
  bool bias;
};

// Kernel cases (in and h multiples of 8) and two the kernel declines (in = 36, h = 12).
const std::vector<GegluCase> kKernelCases = {{1, 8, 8, true},       {77, 40, 24, true},    {300, 72, 136, false},
                                             {129, 640, 264, true}, {64, 1280, 128, true}, {4100, 320, 1288, true}};
const std::vector<GegluCase> kDeclinedCases = {{33, 36, 24, true}, {20, 64, 12, false}};

struct Operands {
  Tensor x, w, b;          // on the GPU in the tested dtype (b undefined without bias)
  Tensor x64, w64, b64;    // the same values in f64 on the CPU
};

Operands operands(const GegluCase& c, DType dtype, Generator& gen) {
  Operands o;
  auto pair = [&](const Shape& s, double std, Tensor& gpu, Tensor& cpu) {
    const Tensor t = random_tensor(s, gen, dtype, Device::cpu(), 0.0, std);
    gpu = t.to(kCuda), cpu = t.to(DType::F64);
  };
  pair({c.rows, c.in}, 1.0, o.x, o.x64);
  pair({2 * c.h, c.in}, 1.0 / std::sqrt(double(c.in)), o.w, o.w64);
  if (c.bias) pair({2 * c.h}, 0.5, o.b, o.b64);
  return o;
}

std::string name_of(const GegluCase& c, DType dtype) {
  return std::string(dtype_name(dtype)) + " rows " + std::to_string(c.rows) + " in " + std::to_string(c.in) + " h " +
         std::to_string(c.h) + (c.bias ? " bias" : " no bias");
}

double tol_for(DType dtype) { return dtype == DType::BF16 ? 8e-3 : dtype == DType::F16 ? 1.5e-3 : 1e-5; }

// The backend slot's arguments for c on o's GPU tensors (y allocated, uninitialised).
LinearGegluArgs slot_args(const GegluCase& c, const Operands& o) {
  LinearGegluArgs a;
  a.x = o.x, a.w = o.w, a.bias = o.b, a.rows = c.rows, a.in = c.in, a.h = c.h;
  a.y = Tensor::empty({c.rows, c.h}, o.x.dtype(), kCuda);
  return a;
}

Tensor reference(const Operands& o) { return ops::geglu(ops::linear(o.x64, o.w64, o.b64)); }

// The kernel's two epilogues (LOOM_LINEAR_GEGLU_EPILOGUE): the GELUs by the consumer warpgroups
// after a tile's products, or by a fourth warpgroup from the tile staged in shared memory.
const std::vector<const char*> kEpilogues = {"consumers", "warpgroup"};

// The op (kernel where it applies, else linear + geglu) in bf16, f16 and f32 against f64.
TEST(GpuLinearGeglu, MatchesTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(0x6e61u ^ ::testing::UnitTest::GetInstance()->random_seed());
  std::vector<GegluCase> all = kKernelCases;
  all.insert(all.end(), kDeclinedCases.begin(), kDeclinedCases.end());
  for (const char* epilogue : kEpilogues) {
    ScopedEnv mode("LOOM_LINEAR_GEGLU_EPILOGUE", epilogue);
    for (DType dtype : {DType::BF16, DType::F16, DType::F32}) {
      for (const GegluCase& c : all) {
        const std::string what = name_of(c, dtype) + ", " + epilogue + " epilogue";
        const Operands o = operands(c, dtype, gen);
        const Tensor y = ops::linear_geglu(o.x, o.w, o.b);
        ASSERT_EQ(y.shape(), Shape({c.rows, c.h})) << what;
        EXPECT_EQ(y.device(), kCuda) << what;
        EXPECT_LE(rel_error(y.to(Device::cpu()), reference(o)), tol_for(dtype)) << what;
      }
    }
  }
}

// The kernel itself (Backend::linear_geglu must take every kernel case on an sm_90a device): one
// rounding of y, so in bf16 its error is below that of cuBLAS + the GEGLU pass (three roundings);
// the epilogue warpgroup's (the products rounded when staged) within 10% of the latter;
// LOOM_LINEAR_GEGLU=0 declines.
TEST(GpuLinearGeglu, KernelRunsAndRoundsOnce) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(0x6e62u ^ ::testing::UnitTest::GetInstance()->random_seed());
  Backend& be = backend_for(kCuda);
  for (DType dtype : {DType::BF16, DType::F16}) {
    for (const GegluCase& c : kKernelCases) {
      const Operands o = operands(c, dtype, gen);
      const LinearGegluArgs a = slot_args(c, o);
      if (!be.linear_geglu(a)) GTEST_SKIP() << "no sm_90a GEGLU kernel on this build or device";
      const Tensor ref = reference(o);
      const double fused = rel_error(a.y.to(Device::cpu()), ref);
      EXPECT_LE(fused, tol_for(dtype)) << name_of(c, dtype);
      if (dtype == DType::BF16 && c.rows * c.h >= 100000) {
        const double composed = rel_error(ops::geglu(ops::linear(o.x, o.w, o.b)).to(Device::cpu()), ref);
        EXPECT_LT(fused, composed) << name_of(c, dtype);
        ScopedEnv staged("LOOM_LINEAR_GEGLU_EPILOGUE", "warpgroup");
        ASSERT_TRUE(be.linear_geglu(a)) << name_of(c, dtype);
        EXPECT_LE(rel_error(a.y.to(Device::cpu()), ref), 1.1 * composed) << name_of(c, dtype) << ", warpgroup";
      }
      ScopedEnv off("LOOM_LINEAR_GEGLU", "0");
      EXPECT_FALSE(be.linear_geglu(a)) << name_of(c, dtype);
    }
  }
  for (const GegluCase& c : kDeclinedCases) {
    const LinearGegluArgs a = slot_args(c, operands(c, DType::BF16, gen));
    EXPECT_FALSE(be.linear_geglu(a)) << name_of(c, DType::BF16);
  }
  const Operands o = operands(kKernelCases[1], DType::BF16, gen);
  {
    ScopedEnv bad("LOOM_LINEAR_GEGLU_EPILOGUE", "later");
    EXPECT_THAT(any_error_of([&] { ops::linear_geglu(o.x, o.w, o.b); }),
                ::testing::HasSubstr("LOOM_LINEAR_GEGLU_EPILOGUE='later' is not consumers or warpgroup"));
  }
  ScopedEnv bad("LOOM_LINEAR_GEGLU", "yes");
  EXPECT_THAT(any_error_of([&] { ops::linear_geglu(o.x, o.w, o.b); }),
              ::testing::HasSubstr("LOOM_LINEAR_GEGLU='yes' is not 0 or 1"));
}

}  // namespace
}  // namespace loom::test
