// scaled_dot_product_attention_packed (attention/sdpa.h) on CUDA: the flash kernels read and write
// the projections' layout [B, len, heads·d] directly. Checked on fresh random inputs against the
// CPU in f64 (split layout, math backend) for output and dQ, dK, dV, with the tolerance of
// test_flash.cpp (error at most twice that of CUDA's math backend in the same dtype, plus a floor),
// for every tensor-core head dim, odd lengths, cross-attention with K = 77, masks, batch > 1; and
// against the split-layout flash call (same kernels, same numbers up to the f32 atomics' order).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <sstream>

#include "attention/sdpa.h"
#include "attention/sdpa_backends.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using attention::BackendKind;
using loom::testing::max_abs;
using loom::testing::max_abs_diff;

struct PackedCase {
  DType dtype;
  int64_t batch, heads, q_len, k_len, d;
  bool mask = false;
  std::string name() const {
    std::ostringstream os;
    os << dtype_name(dtype) << " B" << batch << " H" << heads << " Q" << q_len << " K" << k_len << " d" << d
       << (mask ? " masked" : "");
    return os.str();
  }
};

struct Outputs {
  Tensor out, dq, dk, dv;  // f64 on the CPU, packed layout
};


// [B, S, H·d] -> [B·H, S, d] (a copy, for the split-layout calls)
Tensor split(const Tensor& x, int64_t h) {
  const int64_t b = x.size(0), s = x.size(1);
  return x.reshape({b, s, h, -1}).permute({0, 2, 1, 3}).contiguous().reshape({b * h, s, -1});
}
Tensor merge(const Tensor& x, int64_t h) {
  const int64_t b = x.size(0) / h, s = x.size(1);
  return x.reshape({b, h, s, -1}).permute({0, 2, 1, 3}).contiguous().reshape({b, s, -1});
}

// Forward and backward in `dtype` on `dev`; packed: through the packed entry, else split + merge.
Outputs run(const Tensor& q64, const Tensor& k64, const Tensor& v64, const Tensor& mask64, const Tensor& g64,
            const PackedCase& c, DType dtype, Device dev, BackendKind backend, bool packed) {
  auto on = [&](const Tensor& t) { return t.to(dtype).to(dev); };
  attention::SdpaOptions o;
  o.heads = c.heads, o.scale = 1.0 / std::sqrt(double(c.d)), o.backend = backend;
  if (mask64.defined()) o.mask = on(mask64).contiguous();
  auto host = [](const Tensor& t) { return t.to(Device::cpu()).to(DType::F64); };
  if (packed) {
    Variable q(on(q64), true), k(on(k64), true), v(on(v64), true);
    const Variable out = attention::scaled_dot_product_attention_packed(q, k, v, o);
    out.backward(on(g64));
    return {host(out.tensor()), host(q.grad()), host(k.grad()), host(v.grad())};
  }
  Variable q(split(on(q64), c.heads), true), k(split(on(k64), c.heads), true), v(split(on(v64), c.heads), true);
  const Variable out = attention::scaled_dot_product_attention(q, k, v, o);
  out.backward(split(on(g64), c.heads));
  return {merge(host(out.tensor()), c.heads), merge(host(q.grad()), c.heads), merge(host(k.grad()), c.heads),
          merge(host(v.grad()), c.heads)};
}

void check_case(const PackedCase& c) {
  SCOPED_TRACE(c.name());
  static std::random_device rd;
  const uint64_t seed = (uint64_t(rd()) << 32) ^ rd();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Generator gen(seed);
  const int64_t w = c.heads * c.d;
  // Values rounded to the kernel's dtype first: the f64 reference sees what the kernel gets.
  auto rounded = [&](const Tensor& t) { return t.to(c.dtype).to(DType::F64); };
  const Tensor q = rounded(Tensor::randn({c.batch, c.q_len, w}, gen, DType::F64));
  const Tensor k = rounded(Tensor::randn({c.batch, c.k_len, w}, gen, DType::F64));
  const Tensor v = rounded(Tensor::randn({c.batch, c.k_len, w}, gen, DType::F64));
  const Tensor g = rounded(Tensor::randn({c.batch, c.q_len, w}, gen, DType::F64));
  const Tensor mask = c.mask ? rounded(Tensor::randn({c.batch, 1, c.k_len}, gen, DType::F64, Device::cpu(), 0.0, 2.0))
                             : Tensor();
  const Device cuda = Device::cuda(0);
  const int64_t before = attention::detail::packed_flash_calls();
  const Outputs got = run(q, k, v, mask, g, c, c.dtype, cuda, BackendKind::Auto, true);
  EXPECT_EQ(attention::detail::packed_flash_calls(), before + 1) << "the packed layout went through the split path";
  const Outputs ref = run(q, k, v, mask, g, c, DType::F64, Device::cpu(), BackendKind::Math, false);
  const Outputs math = run(q, k, v, mask, g, c, c.dtype, cuda, BackendKind::Math, false);
  const Outputs split_flash = run(q, k, v, mask, g, c, c.dtype, cuda, BackendKind::Flash, false);
  const char* names[] = {"out", "dq", "dk", "dv"};
  const Tensor Outputs::*fields[] = {&Outputs::out, &Outputs::dq, &Outputs::dk, &Outputs::dv};
  for (int i = 0; i < 4; ++i) {
    const double err = max_abs_diff(got.*fields[i], ref.*fields[i]);
    const double err_math = max_abs_diff(math.*fields[i], ref.*fields[i]);
    const double scale = std::max(1.0, max_abs(ref.*fields[i]));
    EXPECT_LE(err, 2 * err_math + loom::testing::flash_rounding_floor(c.dtype, max_abs(ref.*fields[i]))) << names[i] << ": packed flash " << err << ", math " << err_math;
    // The same kernels on the split layout: equal up to the order of the f32 atomic sums (one
    // rounding step of the dtype at most).
    EXPECT_LE(max_abs_diff(got.*fields[i], split_flash.*fields[i]), 1e-2 * scale) << names[i] << " vs split flash";
  }
}

class FlashPackedCuda : public ::testing::TestWithParam<PackedCase> {};

TEST_P(FlashPackedCuda, MatchesTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  check_case(GetParam());
}

// The same with dQ from its own kernel (LOOM_FLASH_BWD_DQ=separate), which writes the packed layout.
TEST_P(FlashPackedCuda, MatchesTheCpuInF64WithSeparateDq) {
  LOOM_SKIP_WITHOUT_CUDA();
  setenv("LOOM_FLASH_BWD_DQ", "separate", 1);
  check_case(GetParam());
  unsetenv("LOOM_FLASH_BWD_DQ");
}

// The same with the mma.sync kernels where the default is Hopper's wgmma (head dim 64 on sm_90).
TEST_P(FlashPackedCuda, MatchesTheCpuInF64WithTheMmaKernels) {
  LOOM_SKIP_WITHOUT_CUDA();
  setenv("LOOM_FLASH_FWD", "mma", 1);
  setenv("LOOM_FLASH_BWD", "mma", 1);
  check_case(GetParam());
  unsetenv("LOOM_FLASH_FWD");
  unsetenv("LOOM_FLASH_BWD");
}

// The same with the other wgmma forwards (the default is the warp-specialised one, whose TMA boxes
// read one head of the packed rows, with zeros past d = 40): the persistent warp-specialised kernel
// and the block-synchronous one.
TEST_P(FlashPackedCuda, MatchesTheCpuInF64WithTheOtherForwards) {
  LOOM_SKIP_WITHOUT_CUDA();
  for (const char* tile : {"ws3x128", "sync"}) {
    SCOPED_TRACE(std::string("LOOM_FLASH_FWD_TILE=") + tile);
    setenv("LOOM_FLASH_FWD_TILE", tile, 1);
    check_case(GetParam());
  }
  unsetenv("LOOM_FLASH_FWD_TILE");
}

std::vector<PackedCase> cases() {
  std::vector<PackedCase> v;
  for (int64_t d : {40, 64, 72, 80, 96, 128, 160}) v.push_back({DType::BF16, 2, 3, 77, 131, d});
  v.push_back({DType::BF16, 2, 8, 333, 77, 40, true});   // SD 1.5's cross-attention shape, masked
  v.push_back({DType::F16, 3, 5, 129, 129, 64});
  v.push_back({DType::F16, 1, 10, 7, 1, 64, true});
  v.push_back({DType::BF16, 1, 1, 4095, 65, 64});
  // enough heads for one block per key range: the wgmma backward writes dK, dV itself (direct_kv)
  v.push_back({DType::BF16, 4, 40, 100, 300, 64});
  v.push_back({DType::F16, 4, 40, 100, 300, 40, true});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Kernels, FlashPackedCuda, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<PackedCase>& info) { return loom::testing::gtest_param_name(info.param.name()); });

// On the CPU (and in f32 on CUDA without TF32) the packed entry is split + attention + merge: same numbers as
// the split call, gradients included (f64 exact).
TEST(FlashPacked, SplitPathOnTheCpuIsExact) {
  Generator gen(7);
  const PackedCase c{DType::F64, 2, 3, 9, 5, 4, true};
  const int64_t w = c.heads * c.d;
  const Tensor q = Tensor::randn({2, 9, w}, gen, DType::F64), k = Tensor::randn({2, 5, w}, gen, DType::F64),
               v = Tensor::randn({2, 5, w}, gen, DType::F64), g = Tensor::randn({2, 9, w}, gen, DType::F64),
               mask = Tensor::randn({2, 1, 5}, gen, DType::F64);
  for (BackendKind b : {BackendKind::Math, BackendKind::Flash}) {
    const Outputs a = run(q, k, v, mask, g, c, DType::F64, Device::cpu(), b, true);
    const Outputs s = run(q, k, v, mask, g, c, DType::F64, Device::cpu(), b, false);
    EXPECT_EQ(max_abs_diff(a.out, s.out), 0.0);
    EXPECT_EQ(max_abs_diff(a.dq, s.dq), 0.0);
    EXPECT_EQ(max_abs_diff(a.dk, s.dk), 0.0);
    EXPECT_EQ(max_abs_diff(a.dv, s.dv), 0.0);
  }
}

TEST(FlashPacked, NamesShapesThatDoNotSplitIntoHeads) {
  Variable q(Tensor::zeros({1, 4, 10}, DType::F32)), k(Tensor::zeros({1, 4, 10}, DType::F32));
  attention::SdpaOptions o;
  o.heads = 3;
  EXPECT_THAT(loom::testing::error_of([&] { attention::scaled_dot_product_attention_packed(q, k, k, o); }),
              ::testing::HasSubstr("do not split into 3 heads"));
}

}  // namespace
}  // namespace loom::test
