// The CUDA backend against the CPU, through the public tensor API only (plus the
// allocator statistics of tensor/cuda/cuda_allocator.h). Every test skips, with
// the reason, where no CUDA device is usable.
//
// References are computed on the CPU in f64 from the very values the GPU sees
// (inputs rounded to the tested dtype first); relative error = ||x − ref|| / ||ref||.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tensor/backend.h"
#include "tensor/cuda/cuda_allocator.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tensor/tensor.h"
#include "tests/test_helpers.h"

namespace loom {
namespace {

const Device kCuda = Device::cuda(0);
const std::vector<DType> kAllDtypes = {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I64};
const std::vector<DType> kFloatDtypes = {DType::F32, DType::F64, DType::BF16, DType::F16};

double rel_err(const Tensor& x, const Tensor& ref) {
  EXPECT_EQ(x.shape(), ref.shape());
  const std::vector<double> xv = x.to_vector(), rv = ref.to_vector();
  EXPECT_EQ(xv.size(), rv.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < xv.size() && i < rv.size(); ++i) {
    num += (xv[i] - rv[i]) * (xv[i] - rv[i]);
    den += rv[i] * rv[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Element-for-element equality of two tensors' values, shapes and dtypes.
void expect_same(const Tensor& gpu, const Tensor& cpu, const std::string& what) {
  ASSERT_EQ(gpu.shape(), cpu.shape()) << what;
  ASSERT_EQ(gpu.dtype(), cpu.dtype()) << what;
  const std::vector<double> g = gpu.to_vector(), c = cpu.to_vector();
  ASSERT_EQ(g.size(), c.size()) << what;
  for (size_t i = 0; i < g.size(); ++i) {
    if (std::isnan(c[i])) {
      EXPECT_TRUE(std::isnan(g[i])) << what << " at " << i;
    } else {
      ASSERT_EQ(g[i], c[i]) << what << " at flat index " << i;
    }
  }
}

// Tolerance of a result stored in `dtype` against an f64 reference.
double tol_for(DType dtype) {
  switch (dtype) {
    case DType::F64: return 1e-12;
    case DType::F32: return 1e-5;
    default: return 1e-2;
  }
}

// ---- copies ----------------------------------------------------------------------------

TEST(CudaBackend, RoundTripIsExactForEveryDtype) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(1);
  for (DType dtype : kAllDtypes) {
    SCOPED_TRACE(dtype_name(dtype));
    Tensor cpu;
    if (dtype == DType::I64) {
      cpu = Tensor::from_values({0, 1, -1, 7, -123456789, 4097, double(int64_t(1) << 40), -double(int64_t(1) << 52)},
                                {2, 4}, DType::I64);
    } else {
      std::vector<double> v = Tensor::randn({37, 5}, gen, DType::F64).to_vector();
      v[0] = 0.0;
      v[1] = -0.0;
      v[2] = INFINITY;
      v[3] = -INFINITY;
      v[4] = 3e-5;  // an f16 subnormal
      cpu = Tensor::from_values(v, {37, 5}, dtype);
    }
    const Tensor gpu = cpu.to(kCuda);
    EXPECT_TRUE(gpu.device().is_cuda());
    const Tensor back = gpu.to(Device::cpu());
    EXPECT_TRUE(back.device().is_cpu());
    expect_same(back, cpu, "round trip");
  }
}

TEST(CudaBackend, StridedCopiesMatchCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(2);
  const Tensor x = Tensor::randn({6, 9, 5}, gen);
  const Tensor g = x.to(kCuda);
  expect_same(g.transpose(0, 2).contiguous(), x.transpose(0, 2).contiguous(), "transpose");
  expect_same(g.permute({1, 2, 0}).contiguous(), x.permute({1, 2, 0}).contiguous(), "permute");
  expect_same(g.slice(1, 1, 9, 3).contiguous(), x.slice(1, 1, 9, 3).contiguous(), "slice step 3");
  expect_same(g.slice(0, 0, 6, 2).slice(2, 1, 5, 2).clone(), x.slice(0, 0, 6, 2).slice(2, 1, 5, 2).clone(),
              "two stepped slices");
  expect_same(g.select(1, 4).contiguous(), x.select(1, 4).contiguous(), "select");
  const Tensor col = x.slice(0, 0, 1).slice(2, 2, 3);  // [1, 9, 1]
  expect_same(col.to(kCuda).expand({6, 9, 5}).contiguous(), col.expand({6, 9, 5}).contiguous(), "expand");
  expect_same(g.select(0, 1).select(0, 2).expand({4, 5}).clone(), x.select(0, 1).select(0, 2).expand({4, 5}).clone(),
              "expand of a row");
  const Tensor scalar = Tensor::scalar(2.5, DType::F32, kCuda);
  expect_same(scalar.expand({3, 7}).contiguous(), Tensor::full({3, 7}, 2.5), "expand of a 0-d tensor");

  // Writes into a non-contiguous destination, with and without a dtype change.
  for (DType dst_dtype : {DType::F32, DType::BF16, DType::F64}) {
    SCOPED_TRACE(dtype_name(dst_dtype));
    const Tensor dc = Tensor::zeros({5, 9, 6}, dst_dtype);
    const Tensor dg = Tensor::zeros({5, 9, 6}, dst_dtype, kCuda);
    dc.transpose(0, 2).copy_(x);
    dg.transpose(0, 2).copy_(g);
    expect_same(dg, dc, "copy_ into a transposed view");
    dc.slice(1, 0, 9, 2).copy_(x.transpose(0, 2).slice(1, 0, 9, 2));
    dg.slice(1, 0, 9, 2).copy_(g.transpose(0, 2).slice(1, 0, 9, 2));
    expect_same(dg, dc, "copy_ between stepped slices");
  }

  // A strided source converted on the way.
  expect_same(g.transpose(0, 1).to(DType::BF16), x.transpose(0, 1).to(DType::BF16), "strided f32 -> bf16");

  // Rows of contiguous runs on both sides, one dtype (a concatenation along the channels, a row
  // slice): the 2-D copy path (cudaMemcpy2DAsync); with a dtype change, the element kernel.
  for (DType dtype : {DType::F32, DType::BF16, DType::F64}) {
    SCOPED_TRACE(std::string("rows of runs ") + dtype_name(dtype));
    const Tensor a = Tensor::randn({2, 3, 5, 7}, gen).to(dtype), b = Tensor::randn({2, 4, 5, 7}, gen).to(dtype);
    expect_same(ops::cat({a.to(kCuda), b.to(kCuda)}, 1), ops::cat({a, b}, 1), "cat along dim 1");
    expect_same(g.slice(2, 1, 4).contiguous(), x.slice(2, 1, 4).contiguous(), "row slice");
    const Tensor dst = Tensor::zeros({2, 7, 5, 7}, dtype, kCuda);
    dst.narrow(1, 3, 4).copy_(b.to(kCuda).to(DType::F32));  // a dtype change: not a 2-D memcpy
    expect_same(dst.narrow(1, 3, 4), b.to(DType::F32).to(dtype), "converting copy into a channel slice");
  }
}

// Permutes between NCHW and NHWC (the spatial transformers' layout changes) take the tiled
// transpose path; sizes that are not multiples of its 32×32 tile, batch 1 and > 1, dtype changes.
TEST(CudaBackend, TransposeCopiesMatchCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(3);
  for (const Shape& shape : {Shape{2, 37, 5, 7}, Shape{1, 64, 33, 9}, Shape{3, 320, 8, 8}, Shape{1, 8, 1, 100}}) {
    const Tensor x = Tensor::randn(shape, gen);
    for (DType src : {DType::F32, DType::BF16, DType::F64}) {
      for (DType dst : {DType::F32, DType::BF16}) {
        SCOPED_TRACE(std::string(dtype_name(src)) + " -> " + dtype_name(dst));
        const Tensor xs = x.to(src), gs = xs.to(kCuda);
        expect_same(gs.permute({0, 2, 3, 1}).to(dst).contiguous(), xs.permute({0, 2, 3, 1}).to(dst).contiguous(),
                    "NCHW -> NHWC");
        const Tensor nhwc = xs.permute({0, 2, 3, 1}).contiguous();
        expect_same(nhwc.to(kCuda).permute({0, 3, 1, 2}).to(dst).contiguous(),
                    nhwc.permute({0, 3, 1, 2}).to(dst).contiguous(), "NHWC -> NCHW");
        expect_same(gs.select(0, 0).transpose(0, 2).to(dst).contiguous(),
                    xs.select(0, 0).transpose(0, 2).to(dst).contiguous(), "2-d transpose");
      }
    }
  }
}

TEST(CudaBackend, CopyRankLimit) {
  LOOM_SKIP_WITHOUT_CUDA();
  const Shape shape9(9, 2);
  Generator gen(3);
  const Tensor x = Tensor::randn(shape9, gen, DType::F32, kCuda);
  // Contiguous 9-d data merges into one dim: fine.
  expect_same(x.clone(), x.to(Device::cpu()), "contiguous 9-d clone");
  // Reversing the dims leaves 9 dims that cannot be merged: a clear error.
  const std::vector<int64_t> reversed = {8, 7, 6, 5, 4, 3, 2, 1, 0};
  try {
    x.permute(reversed).contiguous();
    FAIL() << "expected loom::Error for a 9-d strided copy";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("cuda"), std::string::npos) << msg;
    EXPECT_NE(msg.find("8"), std::string::npos) << msg;
  }
}

TEST(CudaBackend, DtypeConversionsMatchCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(4);
  // Float sources stay inside f16's range (no inf, whose integer conversion is undefined).
  std::vector<double> fv = Tensor::randn({61}, gen, DType::F64, Device::cpu(), 0.0, 100.0).to_vector();
  for (double v : {0.0, -0.0, 0.5, -2.5, 2.7, -2.7, 3e-5, -7e-8, 1.0 / 3.0, 65504.0, -60000.0, 1e-3, 257.0})
    fv.push_back(v);
  const std::vector<double> iv = {0, 1, -1, 7, -123, 4097, 2049, 65519, -65519, 16777217, -33554435};
  for (DType from : kAllDtypes) {
    const Tensor src = from == DType::I64 ? Tensor::from_values(iv, {int64_t(iv.size())}, from)
                                          : Tensor::from_values(fv, {int64_t(fv.size())}, from);
    const Tensor src_gpu = src.to(kCuda);
    for (DType to : kAllDtypes) {
      SCOPED_TRACE(std::string(dtype_name(from)) + " -> " + dtype_name(to));
      expect_same(src_gpu.to(to).to(Device::cpu()), src.to(to), "to(dtype)");
    }
  }
}

TEST(CudaBackend, FillMatchesCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  for (DType dtype : kAllDtypes) {
    SCOPED_TRACE(dtype_name(dtype));
    for (double v : {0.0, 1.0, -3.75, 0.1, 1e9}) {
      expect_same(Tensor::full({3, 129}, v, dtype, kCuda), Tensor::full({3, 129}, v, dtype), "full");
    }
    // A non-contiguous fill goes through a broadcast copy.
    const Tensor g = Tensor::zeros({4, 6}, dtype, kCuda);
    const Tensor c = Tensor::zeros({4, 6}, dtype);
    g.slice(1, 1, 6, 2).fill_(5.0);
    c.slice(1, 1, 6, 2).fill_(5.0);
    expect_same(g, c, "strided fill_");
  }
}

// ---- caching allocator ------------------------------------------------------------------

TEST(CudaBackend, CachingAllocatorReusesFreedBlocks) {
  LOOM_SKIP_WITHOUT_CUDA();
  cuda_empty_cache();
  const CudaAllocatorStats s0 = cuda_allocator_stats(0);
  EXPECT_EQ(s0.bytes_cached, 0u);
  const size_t nbytes = 1000 * 37 * 4;

  const void* first = nullptr;
  {
    const Tensor t = Tensor::empty({1000, 37}, DType::F32, kCuda);
    first = t.raw_data();
    const CudaAllocatorStats s1 = cuda_allocator_stats(0);
    EXPECT_EQ(s1.cuda_malloc_calls, s0.cuda_malloc_calls + 1);
    EXPECT_GE(s1.bytes_in_use, s0.bytes_in_use + nbytes);
    EXPECT_EQ(s1.bytes_in_use % 512, 0u) << "sizes are rounded to 512 bytes";
  }
  const CudaAllocatorStats s2 = cuda_allocator_stats(0);
  EXPECT_EQ(s2.bytes_in_use, s0.bytes_in_use);
  EXPECT_GE(s2.bytes_cached, nbytes);

  {
    // Same byte count, other shape and dtype: served from the cache, same block.
    const Tensor t = Tensor::empty({37, 500}, DType::F64, kCuda);
    EXPECT_EQ(t.raw_data(), first);
    const CudaAllocatorStats s3 = cuda_allocator_stats(0);
    EXPECT_EQ(s3.cuda_malloc_calls, s2.cuda_malloc_calls);
    EXPECT_EQ(s3.cache_hits, s2.cache_hits + 1);
    EXPECT_EQ(s3.bytes_cached, s2.bytes_cached - (s3.bytes_in_use - s2.bytes_in_use));
  }

  cuda_empty_cache();
  const CudaAllocatorStats s4 = cuda_allocator_stats(0);
  EXPECT_EQ(s4.bytes_cached, 0u);
  EXPECT_EQ(s4.blocks_cached, 0u);
  EXPECT_GT(s4.cuda_free_calls, s2.cuda_free_calls);
  EXPECT_EQ(s4.bytes_in_use, s0.bytes_in_use);
}

// ---- GEMM --------------------------------------------------------------------------------

// matmul on the GPU in `dtype` against the CPU in f64 from the same rounded inputs.
void check_matmul(const Tensor& a, const Tensor& b, DType dtype, double tol, const std::string& what) {
  SCOPED_TRACE(what + " " + dtype_name(dtype));
  const Tensor ar = a.to(dtype), br = b.to(dtype);  // rounded on the CPU
  const Tensor ref = ops::matmul(ar.to(DType::F64), br.to(DType::F64));
  const Tensor out = ops::matmul(ar.to(kCuda), br.to(kCuda));
  EXPECT_TRUE(out.device().is_cuda());
  EXPECT_EQ(out.dtype(), dtype);
  const double err = rel_err(out, ref);
  EXPECT_LE(err, tol) << "relative error " << err;
}

TEST(CudaBackend, GemmMatchesCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(5);
  // Sizes that are not multiples of 16: m 67, k 129, n 33, batch 3.
  const Tensor a = Tensor::randn({3, 67, 129}, gen, DType::F64);
  const Tensor b = Tensor::randn({3, 129, 33}, gen, DType::F64);
  const Tensor bt = Tensor::randn({3, 33, 129}, gen, DType::F64);
  const Tensor at = Tensor::randn({3, 129, 67}, gen, DType::F64);
  const Tensor b2 = Tensor::randn({129, 33}, gen, DType::F64);
  for (DType dtype : kFloatDtypes) {
    const double tol = dtype == DType::F32 ? 1e-5 : tol_for(dtype);
    check_matmul(a, b, dtype, tol, "batched");
    check_matmul(a, bt.transpose(1, 2), dtype, tol, "batched, b transposed");
    check_matmul(at.transpose(1, 2), b, dtype, tol, "batched, a transposed");
    check_matmul(a, b2, dtype, tol, "batched with a shared b");
    check_matmul(a.select(0, 1), b.select(0, 2), dtype, tol, "single");
  }
}

// ops::linear with a bias. bf16 / f16: the bias rides in cuBLASLt's epilogue (cuda_gemm_lt.cu)
// where it can (one problem, a 16-byte aligned bias); else the GEMM, then a bias pass (a batch of
// problems from a non-contiguous input; a bias view off the 16-byte grid). f32 / f64: GEMM, then
// the broadcast add. Every path against the CPU in f64, sizes off every tile; the bias is large
// enough that a lost or misplaced one fails the bound.
TEST(CudaBackend, LinearBiasMatchesCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(13);
  struct Case {
    Shape x;  // transposed(0, 1) first where `transposed`
    int64_t out;
    bool transposed;
    int64_t bias_offset;
  };
  for (const Case& c : {Case{{67, 129}, 33, false, 0}, Case{{3, 37, 129}, 40, false, 0},
                        Case{{37, 3, 129}, 40, true, 0}, Case{{67, 128}, 40, false, 1},
                        Case{{5, 64}, 8, false, 0}, Case{{2, 11, 40}, 2560, false, 0}}) {
    const Tensor x = Tensor::randn(c.x, gen, DType::F64);
    const Tensor w = Tensor::randn({c.out, c.x.back()}, gen, DType::F64);
    const Tensor b = ops::mul_scalar(Tensor::randn({c.out + c.bias_offset}, gen, DType::F64), 4.0);
    for (DType dtype : kFloatDtypes) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " x " + ::testing::PrintToString(c.x) + " out " +
                   std::to_string(c.out) + (c.transposed ? " transposed" : "") + " bias offset " +
                   std::to_string(c.bias_offset));
      const Tensor xr = x.to(dtype), wr = w.to(dtype), br = b.to(dtype);
      Tensor gx = xr.to(kCuda), rx = xr.to(DType::F64);
      if (c.transposed) gx = gx.transpose(0, 1), rx = rx.transpose(0, 1);
      const Tensor gb = br.to(kCuda).narrow(0, c.bias_offset, c.out);
      const Tensor rb = br.to(DType::F64).narrow(0, c.bias_offset, c.out);
      const Tensor out = ops::linear(gx, wr.to(kCuda), gb);
      EXPECT_EQ(out.dtype(), dtype);
      const double err = rel_err(out, ops::linear(rx, wr.to(DType::F64), rb));
      EXPECT_LE(err, tol_for(dtype)) << "relative error " << err;
    }
  }
}

// A Linear on channels-first activations viewed channels-last ([B, C, S] transposed to [B, S, C],
// as the spatial transformer's proj_in reads its input): a strided batch of transposed problems,
// through cuBLASLt's batched bias epilogue (bf16 / f16), against the CPU in f64.
TEST(CudaBackend, LinearBiasOnATransposedBatchMatchesCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(19);
  for (const Shape& shape : {Shape{2, 40, 72}, Shape{3, 64, 33}}) {
    const Tensor x = Tensor::randn(shape, gen, DType::F64);  // [B, C, S]
    const Tensor w = Tensor::randn({48, shape[1]}, gen, DType::F64);
    const Tensor b = ops::mul_scalar(Tensor::randn({48}, gen, DType::F64), 4.0);
    for (DType dtype : kFloatDtypes) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " x " + ::testing::PrintToString(shape));
      const Tensor xr = x.to(dtype), wr = w.to(dtype), br = b.to(dtype);
      const Tensor out = ops::linear(xr.to(kCuda).transpose(1, 2), wr.to(kCuda), br.to(kCuda));
      const Tensor ref = ops::linear(xr.to(DType::F64).transpose(1, 2), wr.to(DType::F64), br.to(DType::F64));
      EXPECT_LE(rel_err(out, ref), tol_for(dtype));
    }
  }
}

// ---- elementwise, reductions, softmax ----------------------------------------------------

TEST(CudaBackend, UnaryMatchesCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(6);
  const Tensor any = Tensor::randn({129, 67}, gen, DType::F64);
  const Tensor pos = Tensor::rand({129, 67}, gen, DType::F64, Device::cpu(), 0.5, 2.0);
  struct Case {
    const char* name;
    bool positive;
    std::function<Tensor(const Tensor&)> f;
  };
  const std::vector<Case> cases = {
      {"neg", false, [](const Tensor& x) { return ops::neg(x); }},
      {"exp", false, [](const Tensor& x) { return ops::exp(x); }},
      {"log", true, [](const Tensor& x) { return ops::log(x); }},
      {"sqrt", true, [](const Tensor& x) { return ops::sqrt(x); }},
      {"rsqrt", true, [](const Tensor& x) { return ops::rsqrt(x); }},
      {"tanh", false, [](const Tensor& x) { return ops::tanh(x); }},
      {"sigmoid", false, [](const Tensor& x) { return ops::sigmoid(x); }},
      {"relu", false, [](const Tensor& x) { return ops::relu(x); }},
      {"step", false, [](const Tensor& x) { return ops::step(x); }},
      {"gelu", false, [](const Tensor& x) { return ops::gelu(x, false); }},
      {"gelu tanh", false, [](const Tensor& x) { return ops::gelu(x, true); }},
      {"gelu_grad", false, [](const Tensor& x) { return ops::gelu_grad(x, false); }},
      {"gelu_grad tanh", false, [](const Tensor& x) { return ops::gelu_grad(x, true); }},
      {"silu", false, [](const Tensor& x) { return ops::silu(x); }},
      {"silu_grad", false, [](const Tensor& x) { return ops::silu_grad(x); }},
      {"abs", false, [](const Tensor& x) { return ops::abs(x); }},
      {"square", false, [](const Tensor& x) { return ops::square(x); }},
      {"reciprocal", true, [](const Tensor& x) { return ops::reciprocal(x); }},
      {"add_scalar", false, [](const Tensor& x) { return ops::add_scalar(x, 0.75); }},
      {"mul_scalar", false, [](const Tensor& x) { return ops::mul_scalar(x, -1.5); }},
      {"pow_scalar", true, [](const Tensor& x) { return ops::pow_scalar(x, 1.7); }},
  };
  for (DType dtype : kFloatDtypes) {
    const Tensor any_r = any.to(dtype), pos_r = pos.to(dtype);
    for (const Case& c : cases) {
      SCOPED_TRACE(std::string(c.name) + " " + dtype_name(dtype));
      const Tensor& x = c.positive ? pos_r : any_r;
      const Tensor out = c.f(x.to(kCuda));
      EXPECT_EQ(out.dtype(), dtype);
      const double err = rel_err(out, c.f(x.to(DType::F64)));
      EXPECT_LE(err, tol_for(dtype)) << "relative error " << err;
    }
  }
}

TEST(CudaBackend, BinaryBroadcastMatchesCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(7);
  const Tensor a = Tensor::randn({4, 1, 67}, gen, DType::F64);
  const Tensor b = Tensor::rand({5, 67}, gen, DType::F64, Device::cpu(), 0.5, 2.0);
  const Tensor c = Tensor::randn({67, 5, 4}, gen, DType::F64).permute({2, 1, 0});  // non-contiguous [4, 5, 67]
  using BinFn = Tensor (*)(const Tensor&, const Tensor&);
  const std::vector<std::pair<const char*, BinFn>> fns = {
      {"add", ops::add}, {"sub", ops::sub}, {"mul", ops::mul},
      {"div", ops::div}, {"maximum", ops::maximum}, {"minimum", ops::minimum}};
  for (DType dtype : kFloatDtypes) {
    const Tensor ar = a.to(dtype), br = b.to(dtype), cr = c.to(dtype);
    for (const auto& [name, f] : fns) {
      SCOPED_TRACE(std::string(name) + " " + dtype_name(dtype));
      const Tensor out = f(ar.to(kCuda), br.to(kCuda));
      EXPECT_EQ(out.shape(), (Shape{4, 5, 67}));
      EXPECT_LE(rel_err(out, f(ar.to(DType::F64), br.to(DType::F64))), tol_for(dtype));
      const Tensor out2 = f(cr.to(kCuda), br.to(kCuda));
      EXPECT_LE(rel_err(out2, f(cr.to(DType::F64), br.to(DType::F64))), tol_for(dtype));
    }
  }
}

// The elementwise launchers take 16-byte vector paths when every pointer is aligned and a
// scalar path otherwise; both must give the CPU's values at every length (tails of n % 8) and
// at element offsets that break the alignment (views starting at element 1 or 3).
// One operand constant along the innermost dim, the other contiguous (a conv's per-channel bias,
// a [N, C, 1, 1] time embedding, a scalar tensor), or broadcast over outer dims and contiguous
// along the innermost (a Linear's bias [C] over [rows, C], a [B, 1, C] row): the 16-byte pack
// paths when the inner extent is a multiple of the pack (both operand orders, every op), the
// strided path otherwise (odd extents; a broadcast operand whose rows are not 16-byte aligned).
TEST(CudaBackend, InnerBroadcastPathsMatchCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(12);
  using BinFn = Tensor (*)(const Tensor&, const Tensor&);
  const std::vector<std::pair<const char*, BinFn>> fns = {
      {"add", ops::add}, {"sub", ops::sub}, {"mul", ops::mul},
      {"div", ops::div}, {"maximum", ops::maximum}, {"minimum", ops::minimum}};
  struct Case { Shape full, bcast; };
  for (const Case& c : {Case{{3, 5, 64}, {5, 1}}, Case{{2, 7, 6, 8}, {2, 7, 1, 1}}, Case{{4, 24}, {4, 1}},
                        Case{{40}, {1}}, Case{{3, 5, 66}, {5, 1}}, Case{{2, 3, 16}, {1, 3, 1}},
                        Case{{37, 24}, {24}}, Case{{3, 5, 16}, {5, 16}}, Case{{2, 3, 40}, {2, 1, 40}},
                        Case{{6, 20}, {20}}, Case{{3, 7, 8}, {3, 1, 8}}, Case{{5, 12}, {1, 12}},
                        Case{{4, 3, 6}, {3, 6}}}) {
    const Tensor x = Tensor::randn(c.full, gen, DType::F64);
    const Tensor y = Tensor::rand(c.bcast, gen, DType::F64, Device::cpu(), 0.5, 2.0);
    for (DType dtype : kFloatDtypes) {
      const Tensor xr = x.to(dtype), yr = y.to(dtype);
      for (const auto& [name, f] : fns) {
        SCOPED_TRACE(std::string(name) + " " + dtype_name(dtype) + " " + ::testing::PrintToString(c.full));
        EXPECT_LE(rel_err(f(xr.to(kCuda), yr.to(kCuda)), f(xr.to(DType::F64), yr.to(DType::F64))), tol_for(dtype));
        EXPECT_LE(rel_err(f(yr.to(kCuda), xr.to(kCuda)), f(yr.to(DType::F64), xr.to(DType::F64))), tol_for(dtype));
      }
    }
  }
  // a broadcast row starting off the 16-byte grid (a view at element 1) takes the strided path
  const Tensor x = Tensor::randn({9, 16}, gen, DType::F64);
  const Tensor row = Tensor::rand({17}, gen, DType::F64, Device::cpu(), 0.5, 2.0);
  for (DType dtype : kFloatDtypes) {
    SCOPED_TRACE(std::string("unaligned row ") + dtype_name(dtype));
    const Tensor xr = x.to(dtype), rr = row.to(dtype);
    const Tensor got = ops::add(xr.to(kCuda), rr.to(kCuda).narrow(0, 1, 16));
    EXPECT_LE(rel_err(got, ops::add(xr.to(DType::F64), rr.to(DType::F64).narrow(0, 1, 16))), tol_for(dtype));
  }
}

// A spatial transformer's exit: proj_out's output stored [B, H·W, C], viewed as [B, C, H, W],
// plus the contiguous NCHW input (the tiled transposed-add path), in both operand orders, at
// extents that are not multiples of its 32 × 32 tile, with one sample (the batch dim merges
// away) and with a batch view whose samples lie apart (a batch stride larger than H·W·C).
// Addition rounds the same in either order, so the GPU must equal the CPU bit for bit; a
// subtraction of the same layout (the strided path) must too.
TEST(CudaBackend, AddOfATransposedLayoutMatchesCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(21);
  struct Case { int64_t b, c, h, w; bool spaced; };
  for (const Case& k : {Case{2, 40, 9, 7, false}, Case{1, 33, 5, 13, false}, Case{3, 64, 8, 8, false},
                        Case{2, 70, 3, 37, true}, Case{4, 2, 2, 2, false}}) {
    const int64_t s = k.h * k.w;
    const Tensor store = Tensor::randn({k.b, k.spaced ? s + 3 : s, k.c}, gen, DType::F64);
    const Tensor x = Tensor::randn({k.b, k.c, k.h, k.w}, gen, DType::F64);
    for (DType dtype : kFloatDtypes) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " [" + std::to_string(k.b) + ", " + std::to_string(k.c) + ", " +
                   std::to_string(k.h) + ", " + std::to_string(k.w) + "]" + (k.spaced ? " spaced" : ""));
      auto nchw_view = [&](const Tensor& t) {  // [B, S', C] -> first S rows -> [B, C, H, W]
        return t.narrow(1, 0, s).reshape({k.b, k.h, k.w, k.c}).permute({0, 3, 1, 2});
      };
      const Tensor st = store.to(dtype), xr = x.to(dtype);
      const Tensor gs = st.to(kCuda), gx = xr.to(kCuda);
      expect_same(ops::add(nchw_view(gs), gx).to(Device::cpu()), ops::add(nchw_view(st), xr), "view + x");
      expect_same(ops::add(gx, nchw_view(gs)).to(Device::cpu()), ops::add(xr, nchw_view(st)), "x + view");
      expect_same(ops::sub(gx, nchw_view(gs)).to(Device::cpu()), ops::sub(xr, nchw_view(st)), "x - view");
    }
  }
}

TEST(CudaBackend, VectorAndScalarElementwisePathsMatchCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(11);
  const std::vector<int64_t> lengths = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100003};
  for (DType dtype : kFloatDtypes) {
    for (int64_t n : lengths) {
      for (int64_t offset : {0, 1, 3}) {
        SCOPED_TRACE(std::string(dtype_name(dtype)) + " n=" + std::to_string(n) + " offset=" + std::to_string(offset));
        const Tensor base_a = Tensor::randn({n + 4}, gen, DType::F64).to(dtype);
        const Tensor base_b = Tensor::randn({n + 4}, gen, DType::F64).to(dtype);
        const Tensor a = base_a.narrow(0, offset, n), b = base_b.narrow(0, 1, n);
        const Tensor ga = base_a.to(kCuda).narrow(0, offset, n), gb = base_b.to(kCuda).narrow(0, 1, n);
        expect_same(ops::add(ga, gb).to(Device::cpu()), ops::add(a, b), "add");
        expect_same(ops::mul(ga, ga).to(Device::cpu()), ops::mul(a, a), "mul");
        expect_same(ops::mul_scalar(ga, -1.5).to(Device::cpu()), ops::mul_scalar(a, -1.5), "mul_scalar");
        EXPECT_LE(rel_err(ops::exp(ga).to(Device::cpu()), ops::exp(a.to(DType::F64))), tol_for(dtype)) << "exp";
        for (DType to : kFloatDtypes)
          expect_same(ga.to(to).to(Device::cpu()), a.to(to), std::string("convert to ") + dtype_name(to));
      }
    }
  }
}

TEST(CudaBackend, ReductionsMatchCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(8);
  const Tensor x = Tensor::rand({7, 300, 33}, gen, DType::F64);
  const Tensor y = Tensor::randn({3, 5000}, gen, DType::F64);  // long rows: one block per row
  for (DType dtype : {DType::F32, DType::F64, DType::BF16}) {
    const Tensor xr = x.to(dtype), yr = y.to(dtype);
    const Tensor xg = xr.to(kCuda), yg = yr.to(kCuda);
    const Tensor x64 = xr.to(DType::F64), y64 = yr.to(DType::F64);
    const double tol = tol_for(dtype);
    for (const std::vector<int64_t>& dims : std::vector<std::vector<int64_t>>{{0}, {1}, {2}, {0, 2}, {}}) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " dims " + std::to_string(dims.size()) +
                   (dims.empty() ? "" : " first " + std::to_string(dims[0])));
      EXPECT_LE(rel_err(ops::sum(xg, dims), ops::sum(x64, dims)), tol);
      EXPECT_LE(rel_err(ops::mean(xg, dims, true), ops::mean(x64, dims, true)), tol);
      expect_same(ops::amax(xg, dims).to(DType::F64), ops::amax(x64, dims), "amax");
    }
    EXPECT_LE(rel_err(ops::sum(ops::abs(yg), {1}), ops::sum(ops::abs(y64), {1})), tol);
    expect_same(ops::amax(yg, {1}).to(DType::F64), ops::amax(y64, {1}), "amax of long rows");
    expect_same(ops::amax(yg, {0}).to(DType::F64), ops::amax(y64, {0}), "amax over dim 0");
  }
}

TEST(CudaBackend, SoftmaxMatchesCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(9);
  for (const Shape& shape : {Shape{37, 67}, Shape{5, 3000}, Shape{2, 3, 1}}) {
    const Tensor x = Tensor::randn(shape, gen, DType::F64, Device::cpu(), 0.0, 3.0);
    for (DType dtype : kFloatDtypes) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " n " + std::to_string(shape.back()));
      const Tensor xr = x.to(dtype);
      const Tensor xg = xr.to(kCuda), x64 = xr.to(DType::F64);
      const double tol = tol_for(dtype);
      EXPECT_LE(rel_err(ops::softmax(xg, -1), ops::softmax(x64, -1)), tol);
      EXPECT_LE(rel_err(ops::log_softmax(xg, -1), ops::log_softmax(x64, -1)), tol);
      EXPECT_LE(rel_err(ops::softmax(xg, 0), ops::softmax(x64, 0)), tol);
    }
  }
}

// The one-pass softmax backward (both kernel paths: rows ≤ 1024 per warp, longer per block) and
// matmul's alpha inside the GEMM, against the CPU in f64.
TEST(CudaBackend, SoftmaxBackwardAndScaledMatmulMatchCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(10);
  for (const Shape& shape : {Shape{37, 67}, Shape{5, 3001}, Shape{2, 3, 1}}) {
    const Tensor y64 = ops::softmax(Tensor::randn(shape, gen, DType::F64, Device::cpu(), 0.0, 3.0), -1);
    const Tensor g64 = Tensor::randn(shape, gen, DType::F64);
    for (DType dtype : kFloatDtypes) {
      SCOPED_TRACE(std::string(dtype_name(dtype)) + " n " + std::to_string(shape.back()));
      const Tensor y = y64.to(dtype), g = g64.to(dtype);
      const Tensor ref = ops::mul(y.to(DType::F64), ops::sub(g.to(DType::F64), ops::sum(ops::mul(g.to(DType::F64),
                                                                                            y.to(DType::F64)),
                                                                                   {-1}, true)));
      EXPECT_LE(rel_err(ops::softmax_backward(y.to(kCuda), g.to(kCuda), -1), ref), tol_for(dtype));
    }
  }
  const Tensor a = Tensor::randn({3, 17, 33}, gen, DType::F64), b = Tensor::randn({3, 33, 9}, gen, DType::F64);
  for (DType dtype : kFloatDtypes) {
    SCOPED_TRACE(dtype_name(dtype));
    const Tensor ar = a.to(dtype), br = b.to(dtype);
    const Tensor ref = ops::mul_scalar(ops::matmul(ar.to(DType::F64), br.to(DType::F64)), -0.37);
    EXPECT_LE(rel_err(ops::matmul(ar.to(kCuda), br.to(kCuda), -0.37), ref), tol_for(dtype));
  }
}

// ---- errors ------------------------------------------------------------------------------

TEST(CudaBackend, UnsupportedDtypeThrowsNamingDeviceAndDtype) {
  LOOM_SKIP_WITHOUT_CUDA();
  const Tensor x = Tensor::from_values({1, 2, 3}, {3}, DType::I64, kCuda);
  try {
    ops::exp(x);
    FAIL() << "expected loom::Error for exp on an i64 CUDA tensor";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("cuda"), std::string::npos) << msg;
    EXPECT_NE(msg.find("i64"), std::string::npos) << msg;
  }
}

TEST(CudaBackend, ErrorsOnBadDeviceIndex) {
  LOOM_SKIP_WITHOUT_CUDA();
  EXPECT_THROW(Tensor::zeros({2}, DType::F32, Device::cuda(cuda_device_count())), Error);
}

}  // namespace
}  // namespace loom
