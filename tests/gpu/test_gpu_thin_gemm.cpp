// LoRA's thin GEMMs on CUDA against the CPU in f64, at sizes that are no multiple of any tile
// (M = 1007, K = 320 / 640 / 77, r = 1 / 4 / 16), in f32, bf16 and f16 (ctest -L gpu):
//   down  Z [M, r]  = X [M, K]·Aᵀ      thin kernel (tensor/cuda/cuda_gemm_thin.cu)
//   dZ    dZ [M, r] = dY [M, K]·B       thin kernel
//   dA    dA [r, K] = dZᵀ·X             thin kernel, sum over k (A transposed)
//   dB    dB [K, r] = dYᵀ·Z             thin kernel, sum over k (A transposed)
// each with beta 0 (C holds NaN: it must not be read) and beta 1 (accumulation), with rows of A
// 16-byte aligned and not (lda = K + 3: the scalar-load path). The CPU runs the same layouts in
// f64 on the very values the GPU got. Plus LoRA's term through autograd (linear + add_linear)
// forward and backward, as the choke point runs it. Skips, with the reason, without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "tensor/backend.h"
#include "tensor/cuda/cuda_backend.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using loom::testing::rel_error;

double tolerance(DType dtype) {
  switch (dtype) {
    case DType::F32: return 1e-5;
    case DType::F16: return 2e-3;
    default: return 1e-2;  // bf16
  }
}

// The four LoRA GEMM shapes, row-major (tensor/backend.h GemmBatch).
enum class Shape4 { Down, DZ, DA, DB };
const char* shape_name(Shape4 s) {
  switch (s) {
    case Shape4::Down: return "down Z = X·A^T";
    case Shape4::DZ: return "dZ = dY·B";
    case Shape4::DA: return "dA = dZ^T·X";
    case Shape4::DB: return "dB = dY^T·Z";
  }
  return "?";
}

// Operands of one problem as f64 values on the CPU, already rounded to `dtype`.
struct Operands {
  Tensor a, b, c;  // stored layouts, see make_gemm
};

// The GemmBatch of `shape` over the stored operands (pointers filled by the caller).
GemmBatch make_gemm(Shape4 shape, int64_t m_rows, int64_t k_big, int64_t r, int64_t lda_big, double beta) {
  GemmBatch g;
  g.alpha = 0.7, g.beta = beta, g.batch = 1;
  switch (shape) {
    case Shape4::Down:  // A = X [M, K] (lda_big), B = A_w stored [r, K]
      g.m = m_rows, g.n = r, g.k = k_big, g.lda = lda_big, g.trans_b = true, g.ldb = k_big, g.ldc = r;
      break;
    case Shape4::DZ:  // A = dY [M, K] (lda_big), B = B_w stored [K, r]
      g.m = m_rows, g.n = r, g.k = k_big, g.lda = lda_big, g.trans_b = false, g.ldb = r, g.ldc = r;
      break;
    case Shape4::DA:  // A = dZ stored [M, r] (op: transposed), B = X [M, K] (lda_big)
      g.m = r, g.n = k_big, g.k = m_rows, g.trans_a = true, g.lda = r, g.ldb = lda_big, g.ldc = k_big;
      break;
    case Shape4::DB:  // A = dY stored [M, K] (lda_big, transposed), B = Z [M, r]
      g.m = k_big, g.n = r, g.k = m_rows, g.trans_a = true, g.lda = lda_big, g.ldb = r, g.ldc = r;
      break;
  }
  return g;
}

// Stored shapes of A, B, C for `shape`.
Operands make_operands(Shape4 shape, int64_t m_rows, int64_t k_big, int64_t r, int64_t lda_big, double beta,
                       DType dtype, Generator& gen) {
  auto rnd = [&](const loom::Shape& s) { return Tensor::randn(s, gen, DType::F64).to(dtype).to(DType::F64); };
  Operands o;
  const GemmBatch g = make_gemm(shape, m_rows, k_big, r, lda_big, beta);
  switch (shape) {
    case Shape4::Down: o.a = rnd({m_rows, lda_big}), o.b = rnd({r, k_big}); break;
    case Shape4::DZ: o.a = rnd({m_rows, lda_big}), o.b = rnd({k_big, r}); break;
    case Shape4::DA: o.a = rnd({m_rows, r}), o.b = rnd({m_rows, lda_big}); break;
    case Shape4::DB: o.a = rnd({m_rows, lda_big}), o.b = rnd({m_rows, r}); break;
  }
  o.c = beta == 0.0 ? Tensor::full({g.m, g.n}, std::numeric_limits<double>::quiet_NaN(), DType::F64)
                    : rnd({g.m, g.n});
  return o;
}

// Runs g over the operands on `device` in `dtype`; returns C in f64 on the CPU.
Tensor run_gemm(GemmBatch g, const Operands& o, DType dtype, Device device) {
  const Tensor a = o.a.to(dtype).to(device), b = o.b.to(dtype).to(device), c = o.c.to(dtype).to(device);
  g.device = device, g.dtype = dtype;
  g.a = a.raw_data(), g.b = b.raw_data(), g.c = c.raw_data();
  backend_for(device).gemm(g);
  return c.to(Device::cpu()).to(DType::F64);
}

// The kernels are off by default (set_cuda_thin_gemm): each test turns them on while it runs.
struct ThinGemmOn {
  ThinGemmOn() { set_cuda_thin_gemm(true); }
  ~ThinGemmOn() { set_cuda_thin_gemm(false); }
};

TEST(GpuThinGemm, LoraShapesMatchTheCpuInF64AtOddSizes) {
  LOOM_SKIP_WITHOUT_CUDA();
  ThinGemmOn thin;
  Generator gen(::testing::UnitTest::GetInstance()->random_seed() * 31 + 7);
  const int64_t m_rows = 1007;
  for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
    for (int64_t k_big : {320, 640, 77}) {
      for (int64_t r : {1, 4, 16}) {
        for (int64_t lda_big : {k_big, k_big + 3}) {
          for (double beta : {0.0, 1.0}) {
            for (Shape4 shape : {Shape4::Down, Shape4::DZ, Shape4::DA, Shape4::DB}) {
              const std::string what = std::string(shape_name(shape)) + " " + dtype_name(dtype) + " M " +
                                       std::to_string(m_rows) + " K " + std::to_string(k_big) + " r " +
                                       std::to_string(r) + " lda " + std::to_string(lda_big) + " beta " +
                                       std::to_string(beta);
              const GemmBatch g = make_gemm(shape, m_rows, k_big, r, lda_big, beta);
              GemmBatch probe = g;
              probe.dtype = dtype;
              EXPECT_TRUE(cuda_thin_gemm_fits(probe)) << what << ": not the kernel this case is meant for";
              const Operands o = make_operands(shape, m_rows, k_big, r, lda_big, beta, dtype, gen);
              const Tensor got = run_gemm(g, o, dtype, Device::cuda(0));
              const Tensor want = run_gemm(g, o, DType::F64, Device::cpu());
              EXPECT_LE(rel_error(got, want), tolerance(dtype)) << what;
            }
          }
        }
      }
    }
  }
}

// A C row stride wider than n (ldc > n) and an output view inside a larger buffer: only the
// n columns of each row are written.
TEST(GpuThinGemm, WritesOnlyItsColumnsOfAStridedC) {
  LOOM_SKIP_WITHOUT_CUDA();
  ThinGemmOn thin;
  Generator gen(11);
  const int64_t m_rows = 515, k_big = 96, r = 5, ldc = 9;
  const Tensor x = Tensor::randn({m_rows, k_big}, gen, DType::F64).to(DType::F32);
  const Tensor w = Tensor::randn({r, k_big}, gen, DType::F64).to(DType::F32);
  const Tensor c0 = Tensor::randn({m_rows, ldc}, gen, DType::F64).to(DType::F32);
  GemmBatch g;
  g.m = m_rows, g.n = r, g.k = k_big, g.lda = k_big, g.trans_b = true, g.ldb = k_big, g.ldc = ldc, g.alpha = 1.0;
  g.dtype = DType::F32;
  ASSERT_TRUE(cuda_thin_gemm_fits(g));
  auto run = [&](Device device) {
    const Tensor a = x.to(device), b = w.to(device), c = c0.to(device);
    GemmBatch h = g;
    h.device = device, h.a = a.raw_data(), h.b = b.raw_data(), h.c = c.raw_data();
    backend_for(device).gemm(h);
    return c.to(Device::cpu());
  };
  const Tensor got = run(Device::cuda(0)), want = run(Device::cpu());
  EXPECT_LE(rel_error(got.narrow(1, 0, r), want.narrow(1, 0, r)), 1e-5);
  EXPECT_EQ(got.narrow(1, r, ldc - r).to_vector(), c0.narrow(1, r, ldc - r).to_vector()) << "wrote past n";
}

// LoRA's term as the choke point runs it: y + s·(x·Aᵀ)·Bᵀ, forward and all gradients.
TEST(GpuThinGemm, LoraTermThroughAutogradMatchesTheCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  ThinGemmOn thin;
  Generator gen(13);
  for (DType dtype : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const int64_t m_rows = 1007, in = 320, out = 640, r = 4;
    std::vector<Tensor> values;  // y, x, A, B rounded to dtype, as f64
    for (const loom::Shape& s : std::vector<loom::Shape>{{m_rows, out}, {m_rows, in}, {r, in}, {out, r}})
      values.push_back(Tensor::randn(s, gen, DType::F64).to(dtype).to(DType::F64));
    const Tensor up = Tensor::randn({m_rows, out}, gen, DType::F64).to(dtype).to(DType::F64);
    auto run = [&](DType t, Device device) {
      std::vector<Variable> v;
      for (const Tensor& x : values) v.emplace_back(x.to(t).to(device), true);
      const Variable y = add_linear(v[0], linear(v[1], v[2]), v[3], 0.5);
      y.backward(up.to(t).to(device));
      std::vector<Tensor> r_{y.tensor().to(Device::cpu()).to(DType::F64)};
      for (const Variable& x : v) r_.push_back(x.grad().to(Device::cpu()).to(DType::F64));
      return r_;
    };
    const std::vector<Tensor> got = run(dtype, Device::cuda(0)), want = run(DType::F64, Device::cpu());
    const char* names[] = {"y", "dy_in", "dx", "dA", "dB"};
    for (size_t i = 0; i < got.size(); ++i) EXPECT_LE(rel_error(got[i], want[i]), tolerance(dtype)) << names[i];
  }
}

}  // namespace
}  // namespace loom::test
