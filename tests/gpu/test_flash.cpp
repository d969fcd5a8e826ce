// The CUDA flash attention kernels (tensor/cuda/cuda_flash.cu) against the CPU in f64 on fresh
// random inputs (ctest -L gpu): output, log-sum-exp, dQ, dK, dV; every head dim of the tensor-core
// kernels, odd lengths, masks of every accepted shape, causal, batch > 1, cross-attention (K = 77).
// Tolerances: f64 ≤ 1e-10 and f32 ≤ 1e-5 relative; bf16 / f16 as flash-attention's own tests set
// them: the kernel's largest error against f64 at most twice that of the math backend run in the
// same dtype on the same GPU, plus a floor: half an ulp of the largest reference value in that
// dtype, at least 1e-4 (with K = 1 the math backend's dQ and dK are exactly 0 and flash's are
// rounding-sized); flash_rounding_floor in tests/test_helpers.h.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "attention/sdpa.h"
#include "tensor/backend.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using attention::BackendKind;
using loom::testing::max_abs;
using loom::testing::max_abs_diff;
using loom::testing::rel_error;

enum class MaskKind { None, PerKey, PerKey3, PerQuery, KeepMaskFullyMasked, Causal };

struct FlashCase {
  DType dtype;
  int64_t batch, heads, q_len, k_len, d;
  MaskKind mask = MaskKind::None;
  std::string name() const {
    std::ostringstream os;
    os << dtype_name(dtype) << " B" << batch << " H" << heads << " Q" << q_len << " K" << k_len << " d" << d
       << " mask" << int(mask);
    return os.str();
  }
};

using Result = loom::testing::FlashSlotResult;  // f64 on the CPU
using loom::testing::flash_args_on;
using loom::testing::run_flash_slot;


// The additive mask of a case, [Bm, Qm, K] in f64 (undefined for None / Causal).
Tensor make_mask(const FlashCase& c, Generator& gen) {
  switch (c.mask) {
    case MaskKind::PerKey:
    case MaskKind::PerKey3:
      return Tensor::randn({c.batch, 1, c.k_len}, gen, DType::F64, Device::cpu(), 0.0, 2.0);
    case MaskKind::PerQuery:
      return Tensor::randn({c.batch, c.q_len, c.k_len}, gen, DType::F64, Device::cpu(), 0.0, 2.0);
    case MaskKind::KeepMaskFullyMasked: {  // keep-mask as diffusers converts it; batch 0 masks every key
      std::vector<double> m(size_t(c.batch * c.k_len));
      for (int64_t b = 0; b < c.batch; ++b)
        for (int64_t j = 0; j < c.k_len; ++j) m[size_t(b * c.k_len + j)] = (b == 0 || j % 3 == 2) ? -10000.0 : 0.0;
      return Tensor::from_values(m, {c.batch, 1, c.k_len}, DType::F64);
    }
    default: return Tensor();
  }
}

// The math backend through autograd on `dev` in `dtype` (the "same-precision reference").
Result run_math(const FlashAttentionArgs& a64, const Tensor& grad_out64, DType dtype, Device dev) {
  const FlashAttentionArgs a = flash_args_on(a64, dtype, dev);
  Variable q(a.q, true), k(a.k, true), v(a.v, true);
  attention::SdpaOptions o;
  o.mask = a.mask, o.heads = a.heads, o.scale = a.scale, o.causal = a.causal, o.backend = BackendKind::Math;
  const Variable out = attention::scaled_dot_product_attention(q, k, v, o);
  out.backward(grad_out64.to(dtype).to(dev));
  auto host = [](const Tensor& t) { return t.to(Device::cpu()).to(DType::F64); };
  return {host(out.tensor()), Tensor(), host(q.grad()), host(k.grad()), host(v.grad())};
}

void check_case(const FlashCase& c) {
  SCOPED_TRACE(c.name());
  static std::random_device rd;
  // LOOM_TEST_SEED replays the seed a failure printed
  const char* fixed = std::getenv("LOOM_TEST_SEED");
  const uint64_t seed = fixed ? std::strtoull(fixed, nullptr, 10) : (uint64_t(rd()) << 32) ^ rd();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Generator gen(seed);
  const int64_t n = c.batch * c.heads;
  FlashAttentionArgs a64;
  a64.q = Tensor::randn({n, c.q_len, c.d}, gen, DType::F64);
  a64.k = Tensor::randn({n, c.k_len, c.d}, gen, DType::F64);
  a64.v = Tensor::randn({n, c.k_len, c.d}, gen, DType::F64);
  a64.mask = make_mask(c, gen);
  a64.heads = c.heads;
  a64.scale = 1.0 / std::sqrt(double(c.d));
  a64.causal = c.mask == MaskKind::Causal;
  // The f64 reference sees exactly the values the kernel gets.
  FlashAttentionArgs ref_args = flash_args_on(a64, c.dtype, Device::cpu());
  ref_args = flash_args_on(ref_args, DType::F64, Device::cpu());
  const Tensor grad_out = Tensor::randn({n, c.q_len, c.d}, gen, DType::F64).to(c.dtype).to(DType::F64);
  const Result ref = run_flash_slot(ref_args, grad_out, DType::F64, Device::cpu());
  const Result got = run_flash_slot(ref_args, grad_out, c.dtype, Device::cuda(0));
  const char* names[] = {"out", "dq", "dk", "dv"};
  const Tensor Result::*fields[] = {&Result::out, &Result::dq, &Result::dk, &Result::dv};
  if (c.dtype == DType::F64 || c.dtype == DType::F32) {
    // f32 with diffusers' −10000 keep-mask: s − 10000 keeps only ~1e-3 of s in f32 (its spacing
    // there), so no f32 computation of those rows gets closer to f64 than that.
    const double tol = c.dtype == DType::F64 ? 1e-10 : (c.mask == MaskKind::KeepMaskFullyMasked ? 2e-3 : 1e-5);
    for (int i = 0; i < 4; ++i) EXPECT_LE(rel_error(got.*fields[i], ref.*fields[i]), tol) << names[i];
    EXPECT_LE(rel_error(got.lse, ref.lse), tol) << "lse";
    return;
  }
  const Result math = run_math(ref_args, grad_out, c.dtype, Device::cuda(0));
  for (int i = 0; i < 4; ++i) {
    const double err = max_abs_diff(got.*fields[i], ref.*fields[i]);
    const double err_math = max_abs_diff(math.*fields[i], ref.*fields[i]);
    EXPECT_LE(err, 2 * err_math + loom::testing::flash_rounding_floor(c.dtype, max_abs(ref.*fields[i])))
        << names[i] << ": flash max error " << err << ", math in " << dtype_name(c.dtype) << " " << err_math;
  }
  EXPECT_LE(max_abs_diff(got.lse, ref.lse), 1e-3 * std::max(1.0, max_abs(ref.lse))) << "lse";
}

class FlashCuda : public ::testing::TestWithParam<FlashCase> {};

TEST_P(FlashCuda, MatchesTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  check_case(GetParam());
}

std::vector<FlashCase> cases() {
  std::vector<FlashCase> cs;
  for (DType t : {DType::BF16, DType::F16})
    for (int64_t d : {40, 64, 72, 80, 96, 128, 160}) {
      cs.push_back({t, 2, 3, 77, 333, d});
      cs.push_back({t, 1, 2, 7, 1, d});
    }
  for (DType t : {DType::BF16, DType::F16}) {
    cs.push_back({t, 2, 4, 333, 77, 40, MaskKind::PerKey});
    cs.push_back({t, 2, 2, 130, 129, 64, MaskKind::PerQuery});
    cs.push_back({t, 3, 2, 65, 77, 80, MaskKind::KeepMaskFullyMasked});
    cs.push_back({t, 1, 2, 200, 200, 64, MaskKind::Causal});
    cs.push_back({t, 1, 1, 1, 4095, 64});
    cs.push_back({t, 2, 8, 1024, 77, 40, MaskKind::PerKey3});
  }
  for (DType t : {DType::F32, DType::F64}) {
    for (int64_t d : {33, 40, 64, 160}) cs.push_back({t, 2, 3, 77, 130, d});
    cs.push_back({t, 2, 2, 65, 77, 40, MaskKind::PerQuery});
    cs.push_back({t, 3, 2, 65, 77, 80, MaskKind::KeepMaskFullyMasked});
    cs.push_back({t, 1, 2, 100, 100, 64, MaskKind::Causal});
  }
  return cs;
}

INSTANTIATE_TEST_SUITE_P(Kernels, FlashCuda, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<FlashCase>& info) { return loom::testing::gtest_param_name(info.param.name()); });

// Whether LOOM_FLASH_FWD=wgmma runs here (a build with sm_90a kernels on a compute-capability-9.0
// device); elsewhere asking for it must fail with an error that says so.
bool wgmma_kernels_run() {
  setenv("LOOM_FLASH_FWD", "wgmma", 1);
  FlashAttentionArgs a;
  a.q = Tensor::zeros({1, 3, 64}, DType::F64);
  a.k = a.q, a.v = a.q, a.scale = 0.125;
  bool runs = true;
  try {
    run_flash_slot(a, Tensor::zeros({1, 3, 64}, DType::F64), DType::BF16, Device::cuda(0));
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("no sm_90a wgmma kernels"));
    runs = false;
  }
  unsetenv("LOOM_FLASH_FWD");
  return runs;
}

// The cases both paths of the forward and of the backward run at the head dims of the Hopper
// kernels (40, 64): tails of 64- / 128-key tiles and of 64- / 128- / 192-query blocks, one key,
// one query, masks of every shape, causal, a longer sequence.
std::vector<FlashCase> hopper_path_cases() {
  std::vector<FlashCase> cs;
  for (int64_t d : {40, 64}) {
    cs.push_back({DType::BF16, 2, 3, 77, 333, d});
    cs.push_back({DType::F16, 1, 2, 7, 1, d});
    cs.push_back({DType::BF16, 1, 1, 1, 4095, d});
    cs.push_back({DType::F16, 1, 2, 200, 385, d});
    cs.push_back({DType::BF16, 2, 2, 130, 129, d, MaskKind::PerQuery});
    cs.push_back({DType::BF16, 2, 4, 333, 77, d, MaskKind::PerKey});
    cs.push_back({DType::F16, 2, 2, 129, 200, d, MaskKind::PerKey3});
    cs.push_back({DType::BF16, 3, 2, 65, 77, d, MaskKind::KeepMaskFullyMasked});
    cs.push_back({DType::F16, 1, 2, 200, 200, d, MaskKind::Causal});
    cs.push_back({DType::BF16, 1, 1, 450, 450, d, MaskKind::Causal});
    cs.push_back({DType::BF16, 2, 2, 1000, 1000, d});
    // 160 heads: enough blocks that the query tiles are not split, so the wgmma backward writes
    // dK, dV itself (direct_kv), here also with causal rows and a partial last key block
    cs.push_back({DType::BF16, 4, 40, 100, 300, d});
    cs.push_back({DType::F16, 2, 80, 150, 150, d, MaskKind::Causal});
  }
  return cs;
}

// Every warp layout of the tensor-core backward (LOOM_FLASH_BWD_LAYOUT; the default picks one per
// head dim), with dQ from f32 atomics and from its own kernel (LOOM_FLASH_BWD_DQ), against the f64
// CPU reference, at tails of both tile sizes (64 and 128 keys), with masks and causal rows.
TEST(FlashCudaBackwardLayouts, EveryLayoutMatchesTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  setenv("LOOM_FLASH_BWD", "mma", 1);  // the layouts are those of the mma.sync kernel (d = 64: not the default on sm_90)
  for (const char* dq : {"atomic", "separate"}) {
    setenv("LOOM_FLASH_BWD_DQ", dq, 1);
    for (const char* layout : {"narrow64", "narrow128", "wide64", "wide128"}) {
      SCOPED_TRACE(std::string("LOOM_FLASH_BWD_LAYOUT=") + layout + " LOOM_FLASH_BWD_DQ=" + dq);
      setenv("LOOM_FLASH_BWD_LAYOUT", layout, 1);
      for (int64_t d : {40, 64, 80}) {
        check_case({DType::BF16, 2, 3, 77, 333, d});
        check_case({DType::F16, 1, 2, 130, 129, d, MaskKind::PerQuery});
      }
      check_case({DType::BF16, 1, 2, 200, 200, 64, MaskKind::Causal});
      check_case({DType::BF16, 2, 4, 333, 77, 40, MaskKind::PerKey});
    }
  }
  // dQ from its own kernel at every other head dim, with the keep-mask's fully masked batch
  for (int64_t d : {72, 96, 128, 160}) check_case({DType::BF16, 2, 3, 77, 333, d});
  check_case({DType::BF16, 3, 2, 65, 77, 80, MaskKind::KeepMaskFullyMasked});
  unsetenv("LOOM_FLASH_BWD_LAYOUT");
  unsetenv("LOOM_FLASH_BWD_DQ");
  unsetenv("LOOM_FLASH_BWD");
}

// Both backward kernels (LOOM_FLASH_BWD: mma.sync, and Hopper's wgmma where this build and device
// have it), dQ from atomics and from its own kernel, on hopper_path_cases against the f64 CPU
// reference; on wgmma every loop and dQ scheme: the pipelined loop (the next tile's Sᵀ / dPᵀ
// issued behind this tile's dQ: the default with 64 keys, LOOM_FLASH_BWD_PIPE=1 with 128) and the
// plain one (the default with 128 keys, LOOM_FLASH_BWD_PIPE=0 with 64); dQ by bulk
// reductions (the default; with 128 keys one per block and tile, =1 keeps atomics there) and by
// atomics (LOOM_FLASH_BWD_DQ_BULK=0); query tiles split over 3 blocks (LOOM_FLASH_BWD_SPLITS: dK,
// dV through their f32 accumulators).
TEST(FlashCudaBackwardPaths, EveryBackwardMatchesTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  using Settings = std::vector<std::pair<const char*, const char*>>;
  std::vector<Settings> kernels = {{{"LOOM_FLASH_BWD", "mma"}}};
  if (wgmma_kernels_run()) {
    kernels.push_back({{"LOOM_FLASH_BWD", "wgmma"}, {"LOOM_FLASH_BWD_WGMMA_KEYS", "128"}});
    kernels.push_back({{"LOOM_FLASH_BWD", "wgmma"}, {"LOOM_FLASH_BWD_WGMMA_KEYS", "64"}});
    kernels.push_back({{"LOOM_FLASH_BWD", "wgmma"}, {"LOOM_FLASH_BWD_WGMMA_KEYS", "64"}, {"LOOM_FLASH_BWD_PIPE", "0"}});
    kernels.push_back({{"LOOM_FLASH_BWD", "wgmma"}, {"LOOM_FLASH_BWD_WGMMA_KEYS", "64"}, {"LOOM_FLASH_BWD_DQ_BULK", "0"}});
    kernels.push_back({{"LOOM_FLASH_BWD", "wgmma"}, {"LOOM_FLASH_BWD_DQ_BULK", "1"}, {"LOOM_FLASH_BWD_SPLITS", "3"}});
    kernels.push_back({{"LOOM_FLASH_BWD", "wgmma"}, {"LOOM_FLASH_BWD_WGMMA_KEYS", "128"}, {"LOOM_FLASH_BWD_PIPE", "1"}});
    kernels.push_back({{"LOOM_FLASH_BWD", "wgmma"}, {"LOOM_FLASH_BWD_WGMMA_KEYS", "128"}, {"LOOM_FLASH_BWD_PIPE", "1"},
                       {"LOOM_FLASH_BWD_DQ_BULK", "1"}});
    kernels.push_back({{"LOOM_FLASH_BWD", "wgmma"}, {"LOOM_FLASH_BWD_WGMMA_KEYS", "128"}, {"LOOM_FLASH_BWD_DQ_BULK", "1"}});
    kernels.push_back({{"LOOM_FLASH_BWD", "wgmma"}, {"LOOM_FLASH_BWD_DQ_BULK", "all"}, {"LOOM_FLASH_BWD_SPLITS", "3"}});
  }
  for (const Settings& kernel : kernels)
    for (const char* dq : {"atomic", "separate"}) {
      if (kernel.size() > 2 && std::string(dq) == "separate") continue;  // bulk / splits: dQ's atomics path
      std::string trace = std::string("LOOM_FLASH_BWD_DQ=") + dq;
      for (const auto& [name, value] : kernel) {
        setenv(name, value, 1);
        trace += std::string(" ") + name + "=" + value;
      }
      SCOPED_TRACE(trace);
      setenv("LOOM_FLASH_BWD_DQ", dq, 1);
      for (const FlashCase& c : hopper_path_cases()) check_case(c);
      for (const auto& [name, value] : kernel) unsetenv(name);
    }
  unsetenv("LOOM_FLASH_BWD_DQ");
}

// Both forwards (LOOM_FLASH_FWD: mma.sync, and Hopper's wgmma with its default block — the
// warp-specialised ws3x128 — and each other block of LOOM_FLASH_FWD_TILE, warp-specialised and
// block-synchronous) on hopper_path_cases against the f64 CPU reference.
TEST(FlashCudaForwardPaths, EveryForwardMatchesTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  std::vector<std::pair<std::string, std::string>> paths = {{"mma", ""}};
  if (wgmma_kernels_run())
    for (const char* tile : {"", "ws3x128", "ws3x128s3", "ws2x128", "wsp3x128i", "sync", "3x128", "3x128e4", "4x128", "4x128e4", "2x128", "2x64",
                             "4x64", "2x128p"})
      paths.push_back({"wgmma", tile});
  for (const auto& [fwd, tile] : paths) {
    SCOPED_TRACE("LOOM_FLASH_FWD=" + fwd + " LOOM_FLASH_FWD_TILE=" + tile);
    setenv("LOOM_FLASH_FWD", fwd.c_str(), 1);
    setenv("LOOM_FLASH_FWD_TILE", tile.c_str(), 1);
    for (const FlashCase& c : hopper_path_cases()) check_case(c);
  }
  unsetenv("LOOM_FLASH_FWD");
  unsetenv("LOOM_FLASH_FWD_TILE");
}

// The short-key forward (LOOM_FLASH_FWD_SHORT=1 forces it: a call it does not fit is an error) and
// the general mma.sync forward on the same calls (=0), against the f64 CPU reference: every head
// dim at 77 keys (CLIP's), 80 (the tile, no padding), 1 and 16; query counts off the 64- / 128-row
// tiles; enough rows (160 heads × 1000 queries) that each block loops over several query tiles.
TEST(FlashCudaShortKeys, BothForwardsMatchTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  std::vector<FlashCase> cs;
  for (int64_t d : {40, 64, 72, 80, 96, 128, 160}) {
    cs.push_back({DType::BF16, 2, 3, 333, 77, d});
    cs.push_back({DType::F16, 1, 2, 129, 80, d});
  }
  cs.push_back({DType::BF16, 1, 2, 7, 1, 64});
  cs.push_back({DType::F16, 2, 3, 65, 16, 40});
  cs.push_back({DType::BF16, 4, 40, 1000, 77, 64});
  cs.push_back({DType::F16, 2, 40, 1000, 77, 160});
  for (const char* choice : {"1", "0"}) {
    SCOPED_TRACE(std::string("LOOM_FLASH_FWD_SHORT=") + choice);
    setenv("LOOM_FLASH_FWD_SHORT", choice, 1);
    for (const FlashCase& c : cs) check_case(c);
  }
  unsetenv("LOOM_FLASH_FWD_SHORT");
}

// Forcing the short-key forward on a call it does not fit names why.
TEST(FlashCudaShortKeys, ForcedOnACallItDoesNotFitSaysWhy) {
  LOOM_SKIP_WITHOUT_CUDA();
  setenv("LOOM_FLASH_FWD_SHORT", "1", 1);
  FlashAttentionArgs a;
  a.q = Tensor::zeros({1, 3, 64}, DType::F64);
  a.k = Tensor::zeros({1, 81, 64}, DType::F64);
  a.v = a.k, a.scale = 0.125;
  EXPECT_THAT([&] { run_flash_slot(a, Tensor::zeros({1, 3, 64}, DType::F64), DType::BF16, Device::cuda(0)); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("does not fit the short-key forward")));
  a.k = Tensor::zeros({1, 5, 64}, DType::F64), a.v = a.k, a.causal = true;
  EXPECT_THAT([&] { run_flash_slot(a, Tensor::zeros({1, 3, 64}, DType::F64), DType::BF16, Device::cuda(0)); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("it is causal")));
  unsetenv("LOOM_FLASH_FWD_SHORT");
}

// Asking the CUDA flash kernel for what it lacks names the feature (never a silent fallback).
TEST(FlashCudaChecks, NamesWhatItLacks) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(3);
  FlashAttentionArgs a;
  a.q = Tensor::randn({2, 5, 48}, gen, DType::BF16, Device::cuda(0));
  a.k = Tensor::randn({2, 5, 48}, gen, DType::BF16, Device::cuda(0));
  a.v = Tensor::randn({2, 5, 48}, gen, DType::BF16, Device::cuda(0));
  try {
    backend_for(Device::cuda(0)).flash_attention_check(a);
    FAIL() << "head dim 48 in bf16 was accepted";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), ::testing::HasSubstr("attention backend 'flash' does not support head dim 48"));
  }
  // auto takes math for that call, and flash for a covered head dim
  EXPECT_EQ(attention::auto_backend(a.q, a.k, a.v, Tensor(), 1), BackendKind::Math);
  a.q = Tensor::randn({2, 5, 40}, gen, DType::BF16, Device::cuda(0));
  a.k = a.v = Tensor::randn({2, 5, 40}, gen, DType::BF16, Device::cuda(0));
  EXPECT_EQ(attention::auto_backend(a.q, a.k, a.v, Tensor(), 1), BackendKind::Flash);
}

}  // namespace
}  // namespace loom::test
