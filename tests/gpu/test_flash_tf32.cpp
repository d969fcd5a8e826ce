// The TF32 flash kernels (tensor/cuda/cuda_flash_tf32*.cu: f32 inputs while allow_tf32(), the
// switch of --precision tf32) against the CPU in f64 on fresh random inputs (ctest -L gpu):
// output, log-sum-exp, dQ, dK, dV; every head dim, odd lengths (1, 7, 77, 333), masks (B, K) and
// keep-masks through the attention layer's conversion, (B, 1, K), (B, Q, K), causal, batch > 1,
// the packed layout; the calls go through the dispatcher (auto, which must pick flash) and the
// log-sum-exp through the device slot.
// Tolerance, as flash-attention's own tests set it: the kernel's largest error against f64 at most
// twice that of the math algorithm with TF32 GEMMs, plus a floor. That reference error is the
// larger of (a) the math algorithm in f64 on the CPU with every GEMM operand rounded to TF32 (what
// TF32 GEMMs compute, deterministically: cuBLAS may take non-TF32 kernels for some shapes) and
// (b) the math backend on the GPU in f32 with TF32 GEMMs. The floor, relative to the largest
// reference value (at least 1): 1e-5 (with K = 1 every reference's dQ and dK are exactly 0 and the
// kernel's are f32-rounding sized) plus 4·2⁻²⁴·max|mask| (f32 holds a score next to diffusers'
// −10000 keep-mask bias, and the f32 log-sum-exp of such a row, to ~1e-3 only: a row-wide error
// of P the f64 reference does not have, test_flash.cpp's exact-f32 tolerance says the same).
// With allow_tf32() off, f32 stays on the exact kernels (≤ 1e-5 relative).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <sstream>

#include "attention/attention.h"
#include "attention/sdpa.h"
#include "attention/sdpa_backends.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using attention::BackendKind;
using loom::testing::max_abs;
using loom::testing::max_abs_diff;
using loom::testing::rel_error;
using loom::testing::round_to_tf32;
using loom::testing::run_flash_slot;
using loom::testing::ScopedAllowTf32;

enum class Tf32Mask { None, BK, B1K, BQK, KeepBK, Causal };

struct Tf32Case {
  int64_t batch, heads, q_len, k_len, d;
  Tf32Mask mask = Tf32Mask::None;
  bool packed = false;
  std::string name() const {
    std::ostringstream os;
    os << "B" << batch << " H" << heads << " Q" << q_len << " K" << k_len << " d" << d << " mask" << int(mask)
       << (packed ? " packed" : "");
    return os.str();
  }
};

// One case's inputs, f64 on the CPU holding f32 values: q, k, v, g (the output gradient)
// [B·H, len, d]; mask as the SDPA call takes it, [Bm, Qm, K] (undefined for None / Causal).
struct Inputs {
  Tensor q, k, v, g, mask;
};

// f64 outputs on the CPU, [B·H, len, d].
struct Outputs {
  Tensor out, dq, dk, dv;
};

// The case's mask as the attention layer hands it to SDPA: (B, K) and keep-masks through
// Attention::prepare_mask and keep_mask_to_bias (batch 0 of the keep-mask drops every key).
Tensor make_mask(const Tf32Case& c, Generator& gen) {
  Tensor raw;
  switch (c.mask) {
    case Tf32Mask::BK: raw = Tensor::randn({c.batch, c.k_len}, gen, DType::F64, Device::cpu(), 0.0, 2.0); break;
    case Tf32Mask::B1K: raw = Tensor::randn({c.batch, 1, c.k_len}, gen, DType::F64, Device::cpu(), 0.0, 2.0); break;
    case Tf32Mask::BQK:
      raw = Tensor::randn({c.batch, c.q_len, c.k_len}, gen, DType::F64, Device::cpu(), 0.0, 2.0);
      break;
    case Tf32Mask::KeepBK: {
      std::vector<double> keep(size_t(c.batch * c.k_len));
      for (int64_t b = 0; b < c.batch; ++b)
        for (int64_t j = 0; j < c.k_len; ++j) keep[size_t(b * c.k_len + j)] = (b == 0 || j % 3 == 2) ? 0.0 : 1.0;
      raw = attention::keep_mask_to_bias(Tensor::from_values(keep, {c.batch, c.k_len}, DType::F64), DType::F64);
      break;
    }
    default: return Tensor();
  }
  attention::AttentionOptions o;
  o.query_dim = c.heads * c.d, o.heads = c.heads, o.dim_head = c.d;
  const attention::Attention layer(o, gen);
  return layer.prepare_mask(raw, c.batch, c.q_len, c.k_len).to(DType::F32).to(DType::F64).contiguous();
}

Inputs make_inputs(const Tf32Case& c, Generator& gen) {
  const int64_t n = c.batch * c.heads;
  auto f32 = [](const Tensor& t) { return t.to(DType::F32).to(DType::F64); };
  Inputs in;
  in.q = f32(Tensor::randn({n, c.q_len, c.d}, gen, DType::F64));
  in.k = f32(Tensor::randn({n, c.k_len, c.d}, gen, DType::F64));
  in.v = f32(Tensor::randn({n, c.k_len, c.d}, gen, DType::F64));
  in.g = f32(Tensor::randn({n, c.q_len, c.d}, gen, DType::F64));
  in.mask = make_mask(c, gen);
  return in;
}

// [B·H, S, d] <-> [B, S, H·d], through the dispatcher's own head split / merge.
Tensor packed(const Tensor& x, int64_t h) { return attention::merge_heads(Variable(x), h).tensor().contiguous(); }
Tensor split(const Tensor& x, int64_t h) { return attention::split_heads(Variable(x), h).tensor().contiguous(); }

// Forward and backward through the dispatcher in `dtype` on `dev` (the packed entry for packed
// cases, with the layout converted back); results in f64 on the CPU.
Outputs run_sdpa(const Inputs& in, const Tf32Case& c, DType dtype, Device dev, BackendKind backend) {
  auto on = [&](const Tensor& t) { return t.to(dtype).to(dev); };
  auto host = [](const Tensor& t) { return t.to(Device::cpu()).to(DType::F64); };
  attention::SdpaOptions o;
  o.heads = c.heads, o.scale = 1.0 / std::sqrt(double(c.d)), o.backend = backend;
  o.causal = c.mask == Tf32Mask::Causal;
  if (in.mask.defined()) o.mask = on(in.mask);
  if (c.packed) {
    Variable q(on(packed(in.q, c.heads)), true), k(on(packed(in.k, c.heads)), true), v(on(packed(in.v, c.heads)), true);
    const Variable out = attention::scaled_dot_product_attention_packed(q, k, v, o);
    out.backward(on(packed(in.g, c.heads)));
    return {split(host(out.tensor()), c.heads), split(host(q.grad()), c.heads), split(host(k.grad()), c.heads),
            split(host(v.grad()), c.heads)};
  }
  Variable q(on(in.q), true), k(on(in.k), true), v(on(in.v), true);
  const Variable out = attention::scaled_dot_product_attention(q, k, v, o);
  out.backward(on(in.g));
  return {host(out.tensor()), host(q.grad()), host(k.grad()), host(v.grad())};
}

// The log-sum-exp per query row through the device slot (plain layout), f64 on the CPU.
Tensor slot_lse(const Inputs& in, const Tf32Case& c, DType dtype, Device dev) {
  FlashAttentionArgs a;
  a.q = in.q, a.k = in.k, a.v = in.v, a.mask = in.mask, a.heads = c.heads;
  a.scale = 1.0 / std::sqrt(double(c.d)), a.causal = c.mask == Tf32Mask::Causal;
  return run_flash_slot(a, in.g, dtype, dev).lse;
}

// The math algorithm in f64 on the CPU with every GEMM operand rounded to TF32 (the products of
// math with TF32 GEMMs, f64 accumulation); lse into *lse. Shapes as Outputs.
Outputs tf32_math_f64(const Inputs& in, const Tf32Case& c, Tensor* lse) {
  const Tensor q = round_to_tf32(in.q), k = round_to_tf32(in.k), v = round_to_tf32(in.v), g = round_to_tf32(in.g);
  const double scale = 1.0 / std::sqrt(double(c.d));
  Tensor s = ops::matmul(q, round_to_tf32(in.k.transpose(1, 2)), scale);  // [N, Q, K]
  if (in.mask.defined()) {  // [Bm, Qm, K] -> [B, H, Qm, K] -> [N, Qm, K]
    const Tensor m = in.mask.unsqueeze(1).expand({c.batch, c.heads, in.mask.size(1), c.k_len});
    s = ops::add(s, m.reshape({c.batch * c.heads, in.mask.size(1), c.k_len}));
  }
  if (c.mask == Tf32Mask::Causal) {
    std::vector<double> bias(size_t(c.q_len * c.k_len));
    for (int64_t i = 0; i < c.q_len; ++i)
      for (int64_t j = i + 1; j < c.k_len; ++j) bias[size_t(i * c.k_len + j)] = -INFINITY;
    s = ops::add(s, Tensor::from_values(bias, {c.q_len, c.k_len}, DType::F64));
  }
  *lse = ops::logsumexp(s, -1);
  const Tensor p = ops::softmax(s, -1), pr = round_to_tf32(p);
  Outputs o;
  o.out = ops::matmul(pr, v);                                         // [N, Q, d]
  o.dv = ops::matmul(round_to_tf32(p.transpose(1, 2)), g);            // Pᵀ·dO [N, K, d]
  const Tensor dp = ops::matmul(g, round_to_tf32(in.v.transpose(1, 2)));  // dO·Vᵀ [N, Q, K]
  const Tensor ds = ops::softmax_backward(p, dp, -1);
  o.dq = ops::matmul(round_to_tf32(ds), k, scale);                    // [N, Q, d]
  o.dk = ops::matmul(round_to_tf32(ds.transpose(1, 2)), q, scale);    // [N, K, d]
  return o;
}

void check_case(const Tf32Case& c) {
  SCOPED_TRACE(c.name());
  static std::random_device rd;
  const uint64_t seed = (uint64_t(rd()) << 32) ^ rd();
  SCOPED_TRACE("seed " + std::to_string(seed));
  Generator gen(seed);
  const Inputs in = make_inputs(c, gen);
  const Device cpu = Device::cpu(), cuda = Device::cuda(0);
  const ScopedAllowTf32 tf32(true);

  const int64_t packed_before = attention::detail::packed_flash_calls();
  const Outputs got = run_sdpa(in, c, DType::F32, cuda, BackendKind::Auto);
  if (c.packed) {
    EXPECT_EQ(attention::detail::packed_flash_calls(), packed_before + 1) << "packed went the split way";
  }
  const Outputs ref = run_sdpa(in, c, DType::F64, cpu, BackendKind::Math);
  const Outputs math = run_sdpa(in, c, DType::F32, cuda, BackendKind::Math);  // cuBLAS, TF32 GEMMs
  Tensor lse_emulated;
  const Outputs emulated = tf32_math_f64(in, c, &lse_emulated);
  const double floor = 1e-5 + 4 * std::ldexp(1.0, -24) * (in.mask.defined() ? max_abs(in.mask) : 0.0);

  const char* names[] = {"out", "dq", "dk", "dv"};
  const Tensor Outputs::*fields[] = {&Outputs::out, &Outputs::dq, &Outputs::dk, &Outputs::dv};
  for (int i = 0; i < 4; ++i) {
    const double err = max_abs_diff(got.*fields[i], ref.*fields[i]);
    const double err_emulated = max_abs_diff(emulated.*fields[i], ref.*fields[i]);
    const double err_math = max_abs_diff(math.*fields[i], ref.*fields[i]);
    EXPECT_LE(err, 2 * std::max(err_emulated, err_math) + floor * std::max(1.0, max_abs(ref.*fields[i])))
        << names[i] << ": TF32 flash max error " << err << ", f64 math with TF32-rounded GEMM operands "
        << err_emulated << ", math on the GPU with TF32 GEMMs " << err_math;
  }
  // The log-sum-exp through the slot; its forward is the dispatcher's, bit for bit.
  const Tensor lse = slot_lse(in, c, DType::F32, cuda), lse_ref = slot_lse(in, c, DType::F64, cpu);
  const double err_lse = max_abs_diff(lse, lse_ref), err_lse_emulated = max_abs_diff(lse_emulated, lse_ref);
  EXPECT_LE(err_lse, 2 * err_lse_emulated + floor * std::max(1.0, max_abs(lse_ref)))
      << "lse: TF32 flash " << err_lse << ", f64 on TF32-rounded inputs " << err_lse_emulated;
  FlashAttentionArgs a;
  a.q = in.q, a.k = in.k, a.v = in.v, a.mask = in.mask, a.heads = c.heads;
  a.scale = 1.0 / std::sqrt(double(c.d)), a.causal = c.mask == Tf32Mask::Causal;
  EXPECT_EQ(max_abs_diff(run_flash_slot(a, in.g, DType::F32, cuda).out, got.out), 0.0)
      << "the dispatcher's output is not the TF32 flash kernel's";
}

class FlashTf32Cuda : public ::testing::TestWithParam<Tf32Case> {};

TEST_P(FlashTf32Cuda, MatchesTheCpuInF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  check_case(GetParam());
}

std::vector<Tf32Case> cases() {
  std::vector<Tf32Case> cs;
  for (int64_t d : {40, 64, 72, 80, 96, 128, 160}) {
    cs.push_back({2, 3, 77, 333, d});
    cs.push_back({1, 2, 7, 1, d});
    cs.push_back({2, 2, 333, 77, d, Tf32Mask::None, true});
  }
  cs.push_back({2, 4, 333, 77, 40, Tf32Mask::BK});
  cs.push_back({2, 2, 77, 130, 64, Tf32Mask::B1K});
  cs.push_back({2, 2, 130, 129, 80, Tf32Mask::BQK});
  cs.push_back({2, 8, 1, 333, 128, Tf32Mask::BQK});  // 16 rows: a max over 16·128 elements, not 4·128
  cs.push_back({3, 2, 65, 77, 72, Tf32Mask::KeepBK});
  cs.push_back({1, 2, 200, 200, 96, Tf32Mask::Causal});
  cs.push_back({2, 1, 333, 7, 64, Tf32Mask::Causal});
  cs.push_back({2, 3, 77, 77, 160, Tf32Mask::BK, true});
  cs.push_back({2, 8, 333, 77, 40, Tf32Mask::KeepBK, true});
  return cs;
}

INSTANTIATE_TEST_SUITE_P(Kernels, FlashTf32Cuda, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Tf32Case>& info) { return loom::testing::gtest_param_name(info.param.name()); });

// With allow_tf32() off, f32 runs the exact kernels (≤ 1e-5 relative against f64, at a head dim the
// TF32 kernels also cover); switched on, the same call visibly rounds to TF32.
TEST(FlashTf32Switch, OffKeepsF32Exact) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(11);
  const Tf32Case c{2, 3, 77, 130, 64, Tf32Mask::B1K};
  const Inputs in = make_inputs(c, gen);
  FlashAttentionArgs a;
  a.q = in.q, a.k = in.k, a.v = in.v, a.mask = in.mask, a.heads = c.heads, a.scale = 0.125;
  const loom::testing::FlashSlotResult ref = run_flash_slot(a, in.g, DType::F64, Device::cpu());
  {
    const ScopedAllowTf32 off(false);
    const loom::testing::FlashSlotResult got = run_flash_slot(a, in.g, DType::F32, Device::cuda(0));
    EXPECT_LE(rel_error(got.out, ref.out), 1e-5) << "out";
    EXPECT_LE(rel_error(got.lse, ref.lse), 1e-5) << "lse";
    EXPECT_LE(rel_error(got.dq, ref.dq), 1e-5) << "dq";
    EXPECT_LE(rel_error(got.dk, ref.dk), 1e-5) << "dk";
    EXPECT_LE(rel_error(got.dv, ref.dv), 1e-5) << "dv";
  }
  const ScopedAllowTf32 on(true);
  EXPECT_GT(rel_error(run_flash_slot(a, in.g, DType::F32, Device::cuda(0)).out, ref.out), 1e-5)
      << "allow_tf32() on did not reach the TF32 kernels";
}

// What the TF32 family lacks is named (dim, dtype, the supported list); auto picks flash for f32
// only with TF32 and a covered head dim.
TEST(FlashTf32Switch, ChecksAndAuto) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(5);
  const Device cuda = Device::cuda(0);
  FlashAttentionArgs a;
  a.q = a.k = a.v = Tensor::randn({2, 5, 48}, gen, DType::F32, cuda);
  {
    const ScopedAllowTf32 on(true);
    const std::string e = loom::testing::error_of([&] { backend_for(cuda).flash_attention_check(a); });
    EXPECT_THAT(e, ::testing::HasSubstr("does not support head dim 48"));
    EXPECT_THAT(e, ::testing::HasSubstr("f32 with TF32"));
    EXPECT_THAT(e, ::testing::HasSubstr("40, 64, 72, 80, 96, 128, 160"));
    EXPECT_EQ(attention::auto_backend(a.q, a.k, a.v, Tensor(), 1), BackendKind::Math);
    const Tensor x = Tensor::randn({2, 5, 64}, gen, DType::F32, cuda);
    EXPECT_EQ(attention::auto_backend(x, x, x, Tensor(), 1), BackendKind::Flash);
  }
  const ScopedAllowTf32 off(false);
  EXPECT_EQ(loom::testing::error_of([&] { backend_for(cuda).flash_attention_check(a); }), loom::testing::kNoError)
      << "the exact f32 kernels take head dim 48";
  const Tensor x = Tensor::randn({2, 5, 64}, gen, DType::F32, cuda);
  EXPECT_EQ(attention::auto_backend(x, x, x, Tensor(), 1), BackendKind::Math);
}

}  // namespace
}  // namespace loom::test
