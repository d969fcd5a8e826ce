// The fused slots on the CPU against their composed references (layer_norm_composed,
// group_norm_composed, geglu_composed) on fresh random inputs, at sizes that are no
// multiple of any tile: forward and every gradient in f64 (1e-10), f32 against the
// f64 reference (1e-5), bf16 / f16 storage within their rounding (1e-2). Also: a
// backend without a fused kernel says so, and bad operands are named.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "autograd/ops.h"
#include "tensor/backend.h"
#include "tensor/ops_fused.h"
#include "tests/common/fused_reference.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

using loom::testing::any_error_of;
using Vars = std::vector<Variable>;
using Fn = std::function<Variable(const Vars&)>;

Generator fresh_generator(const std::string& name) {
  return Generator(std::hash<std::string>{}(name) ^ ::testing::UnitTest::GetInstance()->random_seed());
}

struct Run {
  Tensor y;
  std::vector<Tensor> grads;
};

// y = fn(inputs) and the gradients of every input for the upstream gradient `up`.
Run forward_backward(const Fn& fn, const std::vector<Tensor>& inputs, const Tensor& up) {
  Vars vars;
  for (const Tensor& t : inputs) vars.emplace_back(t, true);
  const Variable y = fn(vars);
  y.backward(up.to(y.dtype()));
  Run r{y.tensor(), {}};
  for (const Variable& v : vars) r.grads.push_back(v.grad());
  return r;
}

// fused(inputs in dtype) against composed(the same values in f64).
void expect_matches(const Fn& fused, const Fn& composed, const std::vector<Tensor>& inputs_f64, DType dtype,
                    double tol, const std::string& what, Generator& gen) {
  std::vector<Tensor> in_dtype, in_ref;
  for (const Tensor& t : inputs_f64) {
    in_dtype.push_back(t.to(dtype));
    in_ref.push_back(in_dtype.back().to(DType::F64));  // the very values the fused op sees
  }
  Tensor probe;
  {
    NoGradGuard ng;
    Vars v;
    for (const Tensor& t : in_ref) v.emplace_back(t);
    probe = composed(v).tensor();
  }
  const Tensor up = random_tensor(probe.shape(), gen).to(dtype).to(DType::F64);
  const Run ref = forward_backward(composed, in_ref, up);
  const Run got = forward_backward(fused, in_dtype, up);
  ASSERT_EQ(got.y.dtype(), dtype) << what;
  EXPECT_LE(rel_error(got.y, ref.y), tol) << what << ": forward";
  for (size_t i = 0; i < inputs_f64.size(); ++i) {
    ASSERT_TRUE(got.grads[i].defined()) << what << ": no gradient for input " << i;
    EXPECT_EQ(got.grads[i].shape(), inputs_f64[i].shape()) << what;
    EXPECT_LE(rel_error(got.grads[i], ref.grads[i]), tol) << what << ": gradient of input " << i;
  }
}

const std::vector<int64_t> kRows = {1, 7, 333};
const std::vector<int64_t> kWidths = {40, 320, 1283};

// ---- layer norm ---------------------------------------------------------------------------

TEST(FusedLayerNorm, MatchesComposedInF64AtOddSizes) {
  Generator gen = fresh_generator("layer_norm");
  for (int64_t rows : kRows) {
    for (int64_t n : kWidths) {
      const std::string what = "rows " + std::to_string(rows) + ", n " + std::to_string(n);
      const std::vector<Tensor> in = {random_tensor({rows, n}, gen, DType::F64, Device::cpu(), 0.5, 2.0),
                                      random_tensor({n}, gen), random_tensor({n}, gen)};
      expect_matches([n](const Vars& v) { return layer_norm(v[0], {n}, v[1], v[2]); },
                     [n](const Vars& v) { return layer_norm_composed(v[0], {n}, v[1], v[2]); }, in, DType::F64, 1e-10,
                     what, gen);
      expect_matches([n](const Vars& v) { return layer_norm(v[0], {n}, Variable(), Variable(), 1e-6); },
                     [n](const Vars& v) { return layer_norm_composed(v[0], {n}, Variable(), Variable(), 1e-6); },
                     {in[0]}, DType::F64, 1e-10, what + " (no affine)", gen);
    }
  }
}

// add_layer_norm: s = x + residual and norm(s) from one pass, against add then the composed norm
// (forward and every gradient, in f64, with both outputs carrying gradient); in bf16 storage s
// equals ops::add's sum and the norm equals layer_norm of it, bit for bit (the values of the two
// ops apart); a residual of another shape is refused.
TEST(FusedLayerNorm, AfterAnAddMatchesTheAddThenTheNorm) {
  Generator gen = fresh_generator("add_layer_norm");
  for (int64_t rows : kRows) {
    for (int64_t n : kWidths) {
      const std::string what = "rows " + std::to_string(rows) + ", n " + std::to_string(n);
      const std::vector<Tensor> in = {random_tensor({rows, n}, gen, DType::F64, Device::cpu(), 0.5, 2.0),
                                      random_tensor({rows, n}, gen), random_tensor({n}, gen), random_tensor({n}, gen)};
      expect_matches(
          [n](const Vars& v) {
            const auto [s, y] = add_layer_norm(v[0], v[1], {n}, v[2], v[3]);
            return s * 0.25 + y;
          },
          [n](const Vars& v) {
            const Variable s = v[0] + v[1];
            return s * 0.25 + layer_norm_composed(s, {n}, v[2], v[3]);
          },
          in, DType::F64, 1e-10, what, gen);
      const Tensor x = in[0].to(DType::BF16), r = in[1].to(DType::BF16), w = in[2].to(DType::BF16);
      const ops::NormForward f = ops::layer_norm(x, n, w, Tensor(), 1e-5, r);
      const Tensor sum = ops::add(x, r);
      EXPECT_EQ(f.sum.to_vector(), sum.to_vector()) << what << " bf16 sum";
      EXPECT_EQ(f.y.to_vector(), ops::layer_norm(sum, n, w, Tensor(), 1e-5).y.to_vector()) << what << " bf16 norm";
    }
  }
  EXPECT_THROW(add_layer_norm(Variable(random_tensor({3, 8}, gen)), Variable(random_tensor({3, 1}, gen)), {8}), Error);
}

TEST(FusedLayerNorm, F32MatchesTheF64Reference) {
  Generator gen = fresh_generator("layer_norm_f32");
  const std::vector<Tensor> in = {random_tensor({2, 7, 1283}, gen), random_tensor({1283}, gen),
                                  random_tensor({1283}, gen)};
  expect_matches([](const Vars& v) { return layer_norm(v[0], {1283}, v[1], v[2]); },
                 [](const Vars& v) { return layer_norm_composed(v[0], {1283}, v[1], v[2]); }, in, DType::F32, 1e-5,
                 "f32", gen);
}

// ---- group norm ---------------------------------------------------------------------------

struct GroupCase {
  Shape shape;
  int64_t groups;
  double eps;
};
const std::vector<GroupCase> kGroupCases = {
    {{1, 6, 7, 5}, 3, 1e-5}, {{2, 320, 9, 13}, 32, 1e-6}, {{3, 12, 333}, 4, 1e-6}, {{2, 8}, 2, 1e-5}};

std::string describe(const GroupCase& c) {
  return "shape " + Tensor::empty(c.shape).str() + ", groups " + std::to_string(c.groups);
}

// x (mean −0.3, std 1.5), weight and bias [C], f64.
std::vector<Tensor> group_inputs(const GroupCase& c, Generator& gen) {
  const int64_t ch = c.shape[1];
  return {random_tensor(c.shape, gen, DType::F64, Device::cpu(), -0.3, 1.5), random_tensor({ch}, gen),
          random_tensor({ch}, gen)};
}

TEST(FusedGroupNorm, MatchesComposedInF64AtOddSizes) {
  Generator gen = fresh_generator("group_norm");
  for (const GroupCase& c : kGroupCases) {
    const std::string what = describe(c);
    const std::vector<Tensor> in = group_inputs(c, gen);
    const GroupCase cc = c;
    expect_matches([cc](const Vars& v) { return group_norm(v[0], cc.groups, v[1], v[2], cc.eps); },
                   [cc](const Vars& v) { return group_norm_composed(v[0], cc.groups, v[1], v[2], cc.eps); }, in,
                   DType::F64, 1e-10, what, gen);
    expect_matches([cc](const Vars& v) { return group_norm(v[0], cc.groups, Variable(), Variable(), cc.eps); },
                   [cc](const Vars& v) { return group_norm_composed(v[0], cc.groups, Variable(), Variable(), cc.eps); },
                   {in[0]}, DType::F64, 1e-10, what + " (no affine)", gen);
  }
}

TEST(FusedGroupNorm, F32MatchesTheF64Reference) {
  Generator gen = fresh_generator("group_norm_f32");
  const std::vector<Tensor> in = {random_tensor({2, 320, 9, 13}, gen), random_tensor({320}, gen),
                                  random_tensor({320}, gen)};
  expect_matches([](const Vars& v) { return group_norm(v[0], 32, v[1], v[2], 1e-6); },
                 [](const Vars& v) { return group_norm_composed(v[0], 32, v[1], v[2], 1e-6); }, in, DType::F32, 1e-5,
                 "f32", gen);
}

// group_norm_silu: recorded as group_norm then silu where a gradient is wanted (gradients as the
// composed reference's), one fused pass (ops::group_norm with silu) where none is: the same values.
TEST(FusedGroupNorm, SiluFusedWithoutGradsComposedWithGrads) {
  Generator gen = fresh_generator("group_norm_silu");
  for (const GroupCase& c : kGroupCases) {
    const std::string what = describe(c);
    const std::vector<Tensor> in = group_inputs(c, gen);
    const GroupCase cc = c;
    auto composed = [cc](const Vars& v) { return silu(group_norm_composed(v[0], cc.groups, v[1], v[2], cc.eps)); };
    expect_matches([cc](const Vars& v) { return group_norm_silu(v[0], cc.groups, v[1], v[2], cc.eps); }, composed,
                   in, DType::F64, 1e-10, what, gen);
    Tensor fused, reference;
    {
      NoGradGuard ng;
      fused = group_norm_silu(Variable(in[0]), cc.groups, Variable(in[1]), Variable(in[2]), cc.eps).tensor();
      reference = composed({Variable(in[0]), Variable(in[1]), Variable(in[2])}).tensor();
    }
    EXPECT_LE(rel_error(fused, reference), 1e-13) << what << " (no grad: the fused pass)";
    const Tensor f32 =
        group_norm_silu(Variable(in[0].to(DType::F32)), cc.groups, Variable(in[1].to(DType::F32)),
                        Variable(in[2].to(DType::F32)), cc.eps).tensor();  // inputs need no grad: fused
    EXPECT_LE(rel_error(f32, reference), 1e-5) << what << " f32";
  }
}

// group_norm_silu with a shift [N, C] (a conv bias plus the time embedding): recorded as add,
// group_norm and silu where a gradient is wanted (every gradient, the shift's included, as the
// composed reference's), one fused pass where none is, with the sum formed inside it.
TEST(FusedGroupNorm, SiluWithShiftFusedWithoutGradsComposedWithGrads) {
  Generator gen = fresh_generator("group_norm_silu_shift");
  for (const GroupCase& c : kGroupCases) {
    const std::string what = describe(c) + " with shift";
    std::vector<Tensor> in = group_inputs(c, gen);
    const int64_t n = c.shape[0], ch = c.shape[1];
    in.push_back(random_tensor({n, ch}, gen, DType::F64, Device::cpu(), 0.5, 2.0));
    Shape bcast(c.shape.size(), 1);
    bcast[0] = n, bcast[1] = ch;
    const GroupCase cc = c;
    auto composed = [cc, bcast](const Vars& v) {
      return silu(group_norm_composed(v[0] + reshape(v[3], bcast), cc.groups, v[1], v[2], cc.eps));
    };
    expect_matches([cc](const Vars& v) { return group_norm_silu(v[0], cc.groups, v[1], v[2], cc.eps, v[3]); },
                   composed, in, DType::F64, 1e-10, what, gen);
    Tensor fused, reference;
    {
      NoGradGuard ng;
      fused = group_norm_silu(Variable(in[0]), cc.groups, Variable(in[1]), Variable(in[2]), cc.eps, Variable(in[3]))
                  .tensor();
      reference = composed({Variable(in[0]), Variable(in[1]), Variable(in[2]), Variable(in[3])}).tensor();
    }
    EXPECT_LE(rel_error(fused, reference), 1e-13) << what << " (no grad: the fused pass)";
    EXPECT_THROW(group_norm_silu(Variable(in[0]), cc.groups, Variable(in[1]), Variable(in[2]), cc.eps,
                                 Variable(in[3].reshape({n * ch}))),
                 Error)
        << what << ": a flat shift";
  }
}

// ---- GEGLU --------------------------------------------------------------------------------

TEST(FusedGeglu, MatchesComposedInF64AtOddSizes) {
  Generator gen = fresh_generator("geglu");
  for (bool approx : {false, true}) {
    for (int64_t rows : kRows) {
      for (int64_t h : kWidths) {
        const std::string what = std::string(approx ? "tanh" : "erf") + ", rows " + std::to_string(rows) + ", h " +
                                 std::to_string(h);
        expect_matches([approx](const Vars& v) { return geglu(v[0], approx); },
                       [approx](const Vars& v) { return geglu_composed(v[0], approx); },
                       {random_tensor({rows, 2 * h}, gen, DType::F64, Device::cpu(), 0.0, 2.0)}, DType::F64, 1e-12,
                       what, gen);
      }
    }
  }
}

TEST(FusedGeglu, F32MatchesTheF64Reference) {
  Generator gen = fresh_generator("geglu_f32");
  expect_matches([](const Vars& v) { return geglu(v[0]); }, [](const Vars& v) { return geglu_composed(v[0]); },
                 {random_tensor({3, 11, 2 * 1283}, gen)}, DType::F32, 1e-6, "f32", gen);
}

// linear_geglu: recorded as linear and geglu where a gradient is wanted (every gradient as the
// composed reference's), ops::linear_geglu where none is (on the CPU: the same composition), with
// and without a bias, on a [batch, tokens, in] input; bad operands are named.
TEST(FusedLinearGeglu, MatchesLinearThenGegluWithAndWithoutGradients) {
  Generator gen = fresh_generator("linear_geglu");
  for (bool with_bias : {true, false}) {
    const std::string what = with_bias ? "bias" : "no bias";
    std::vector<Tensor> in = {random_tensor({2, 7, 13}, gen), random_tensor({2 * 9, 13}, gen)};
    if (with_bias) in.push_back(random_tensor({2 * 9}, gen));
    auto bias_of = [with_bias](const Vars& v) { return with_bias ? v[2] : Variable(); };
    auto composed = [bias_of](const Vars& v) { return geglu_composed(linear(v[0], v[1], bias_of(v))); };
    expect_matches([bias_of](const Vars& v) { return linear_geglu(v[0], v[1], bias_of(v)); }, composed, in,
                   DType::F64, 1e-12, what, gen);
    Tensor fused, reference;
    {
      NoGradGuard ng;
      Vars v;
      for (const Tensor& t : in) v.emplace_back(t);
      fused = linear_geglu(v[0], v[1], bias_of(v)).tensor();
      reference = composed(v).tensor();
    }
    EXPECT_EQ(fused.shape(), Shape({2, 7, 9})) << what;
    EXPECT_LE(rel_error(fused, reference), 1e-13) << what << " (no grad)";
  }
  const Tensor x = random_tensor({3, 8}, gen), w = random_tensor({6, 8}, gen);
  EXPECT_THAT(any_error_of([&] { ops::linear_geglu(x, random_tensor({5, 8}, gen), Tensor()); }),
              ::testing::HasSubstr("must be [2h, in]"));
  EXPECT_THAT(any_error_of([&] { ops::linear_geglu(x, random_tensor({6, 7}, gen), Tensor()); }),
              ::testing::HasSubstr("does not match weight"));
  EXPECT_THAT(any_error_of([&] { ops::linear_geglu(x, w, random_tensor({5}, gen)); }),
              ::testing::HasSubstr("bias"));
  EXPECT_THAT(any_error_of([&] { ops::linear_geglu(x, w.to(DType::F32), Tensor()); }),
              ::testing::HasSubstr("not of the input's dtype"));
}

// ---- bias + residual ------------------------------------------------------------------------

TEST(FusedBiasResidual, MatchesComposedAtOddSizes) {
  Generator gen = fresh_generator("bias_residual");
  for (int64_t rows : kRows) {
    for (int64_t n : kWidths) {
      const std::string what = "rows " + std::to_string(rows) + ", n " + std::to_string(n);
      const std::vector<Tensor> in = {random_tensor({rows, n}, gen), random_tensor({n}, gen),
                                      random_tensor({rows, n}, gen)};
      expect_matches([](const Vars& v) { return bias_residual(v[0], v[1], v[2]); },
                     [](const Vars& v) { return (v[0] + v[1]) + v[2]; }, in, DType::F64, 1e-14, what, gen);
      expect_matches([](const Vars& v) { return bias_residual(v[0], Variable(), v[1]); },
                     [](const Vars& v) { return v[0] + v[1]; }, {in[0], in[2]}, DType::F32, 1e-7, what + " f32", gen);
    }
  }
}

// A convolution's bias along dim 1 of NCHW (and along a middle dim of a 3-d tensor): forward
// and the bias's gradient (Σ over every other dim) as the broadcast composition's; a bias of
// the wrong length and a dim out of range are refused.
TEST(FusedBiasResidual, AlongTheChannelDimMatchesComposed) {
  Generator gen = fresh_generator("bias_residual_channels");
  for (const Shape& s : {Shape{2, 5, 3, 7}, Shape{1, 3, 40}, Shape{4, 6, 1, 1}}) {
    const std::string what = Tensor::empty(s).str();
    const std::vector<Tensor> in = {random_tensor(s, gen), random_tensor({s[1]}, gen), random_tensor(s, gen)};
    Shape bcast(s.size(), 1);
    bcast[1] = s[1];
    expect_matches([](const Vars& v) { return bias_residual(v[0], v[1], v[2], 1); },
                   [bcast](const Vars& v) { return (v[0] + reshape(v[1], bcast)) + v[2]; }, in, DType::F64, 1e-14,
                   what, gen);
    EXPECT_THROW(bias_residual(Variable(in[0]), Variable(random_tensor({s[1] + 1}, gen)), Variable(in[2]), 1), Error)
        << what;
    EXPECT_THROW(bias_residual(Variable(in[0]), Variable(in[1]), Variable(in[2]), int64_t(s.size())), Error) << what;
  }
}

// ---- add_linear: LoRA's scaled up-projection accumulated by the GEMM ------------------------

TEST(FusedAddLinear, MatchesComposedAtOddSizes) {
  Generator gen = fresh_generator("add_linear");
  for (int64_t rows : kRows) {
    for (int64_t out : {40, 333}) {
      for (int64_t rank : {1, 4, 7}) {
        const std::string what =
            "rows " + std::to_string(rows) + ", out " + std::to_string(out) + ", rank " + std::to_string(rank);
        const std::vector<Tensor> in = {random_tensor({2, rows, out}, gen), random_tensor({2, rows, rank}, gen),
                                        random_tensor({out, rank}, gen)};
        const Fn fused = [](const Vars& v) { return add_linear(v[0], v[1], v[2], 0.37); };
        const Fn composed = [](const Vars& v) { return v[0] + linear(v[1], v[2]) * 0.37; };
        expect_matches(fused, composed, in, DType::F64, 1e-12, what, gen);
        expect_matches(fused, composed, in, DType::F32, 1e-5, what + " f32", gen);
      }
    }
  }
}

TEST(FusedAddLinear, ColumnSliceOfXIsReadAtItsRowStride) {
  Generator gen = fresh_generator("add_linear_slice");
  for (int64_t rows : kRows) {
    const std::string what = "rows " + std::to_string(rows);
    const std::vector<Tensor> in = {random_tensor({2, rows, 37}, gen), random_tensor({2, rows, 9}, gen),
                                    random_tensor({37, 4}, gen)};
    const Fn fused = [](const Vars& v) { return add_linear(v[0], slice(v[1], -1, 3, 7), v[2], -1.3); };
    const Fn composed = [](const Vars& v) { return v[0] + linear(slice(v[1], -1, 3, 7), v[2]) * -1.3; };
    expect_matches(fused, composed, in, DType::F64, 1e-12, what, gen);
    expect_matches(fused, composed, in, DType::F32, 1e-5, what + " f32", gen);
  }
}

// y given up (an rvalue) and held by nothing else: the GEMM accumulates into y's own storage.
TEST(FusedAddLinear, GivenUpSoleTemporaryIsAccumulatedInPlace) {
  Generator gen = fresh_generator("add_linear_into");
  const Variable x(random_tensor({2, 7, 5}, gen), true), w0(random_tensor({6, 5}, gen), true);
  const Variable z(random_tensor({2, 7, 3}, gen), true), w(random_tensor({6, 3}, gen), true);
  const Variable base = linear(x, w0);
  const Variable copied = add_linear(base, z, w, 0.4);  // an lvalue: the copying path
  Variable y = linear(x, w0);
  const void* storage = y.tensor().raw_data();
  const Variable in_place = add_linear(std::move(y), z, w, 0.4);
  EXPECT_FALSE(y.defined());  // NOLINT(bugprone-use-after-move): given up, left undefined
  EXPECT_EQ(in_place.tensor().raw_data(), storage) << "not accumulated in place";
  EXPECT_EQ(in_place.tensor().to_vector(), copied.tensor().to_vector());
  // The gradients are those of the copying path.
  const Tensor up = random_tensor(in_place.shape(), gen);
  in_place.backward(up);
  const std::vector<Tensor> got = {x.grad(), w0.grad(), z.grad(), w.grad()};
  for (const Variable& v : {x, w0, z, w}) v.zero_grad();
  copied.backward(up);
  const std::vector<Tensor> want = {x.grad(), w0.grad(), z.grad(), w.grad()};
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i].to_vector(), want[i].to_vector()) << "input " << i;
}

TEST(FusedAddLinear, GivenUpButHeldElsewhereIsCopied) {
  Generator gen = fresh_generator("add_linear_held");
  const Variable z(random_tensor({4, 3}, gen)), w(random_tensor({5, 3}, gen));
  {  // another handle on the same Variable
    Variable y(random_tensor({4, 5}, gen));
    const Variable keep = y;
    const std::vector<double> before = keep.tensor().to_vector();
    const Variable out = add_linear(std::move(y), z, w, 1.0);
    EXPECT_NE(out.tensor().raw_data(), keep.tensor().raw_data());
    EXPECT_EQ(keep.tensor().to_vector(), before);
  }
  {  // another Tensor on the same storage (a view)
    Variable y(random_tensor({4, 5}, gen));
    const Tensor row = y.tensor().narrow(0, 1, 1);
    const std::vector<double> before = row.to_vector();
    const Variable out = add_linear(std::move(y), z, w, 1.0);
    EXPECT_EQ(row.to_vector(), before);
    EXPECT_NE(out.tensor().storage(), row.storage());
  }
  {  // a leaf that trains: never overwritten, and not taken (the copying path leaves y as it was)
    Variable y(random_tensor({4, 5}, gen), true);
    const std::vector<double> before = y.tensor().to_vector();
    const Variable out = add_linear(std::move(y), z, w, 1.0);
    ASSERT_TRUE(y.defined());  // NOLINT(bugprone-use-after-move)
    EXPECT_EQ(y.tensor().to_vector(), before);
    EXPECT_NE(out.tensor().storage(), y.tensor().storage());
  }
}

// ---- bf16 / f16 storage on the CPU (f32 compute), at the tensor level ----------------------

// Composed f64 forward and gradients of the rounded inputs, against the fused op in dtype.
void expect_half_matches(DType dtype) {
  Generator gen = fresh_generator(std::string("half_") + dtype_name(dtype));
  const double tol = 1e-2;
  {  // layer norm [333, 320]
    const Tensor x = random_tensor({333, 320}, gen).to(dtype), w = random_tensor({320}, gen).to(dtype),
                 b = random_tensor({320}, gen).to(dtype), dy = random_tensor({333, 320}, gen).to(dtype);
    const ops::NormForward f = ops::layer_norm(x, 320, w, b, 1e-5);
    EXPECT_EQ(f.y.dtype(), dtype);
    EXPECT_EQ(f.mean.dtype(), DType::F32);
    const ops::NormGrads d = ops::layer_norm_backward(dy, x, 320, w, f.mean, f.rstd);
    const Run ref = forward_backward([](const Vars& v) { return layer_norm_composed(v[0], {320}, v[1], v[2]); },
                                     {x.to(DType::F64), w.to(DType::F64), b.to(DType::F64)}, dy.to(DType::F64));
    EXPECT_LE(rel_error(f.y, ref.y), tol) << "layer_norm forward";
    EXPECT_LE(rel_error(d.dx, ref.grads[0]), tol) << "layer_norm dx";
    EXPECT_LE(rel_error(d.dweight, ref.grads[1]), tol) << "layer_norm dweight";
    EXPECT_LE(rel_error(d.dbias, ref.grads[2]), tol) << "layer_norm dbias";
  }
  {  // group norm [2, 64, 7, 9], 32 groups
    const Tensor x = random_tensor({2, 64, 7, 9}, gen).to(dtype), w = random_tensor({64}, gen).to(dtype),
                 b = random_tensor({64}, gen).to(dtype), dy = random_tensor({2, 64, 7, 9}, gen).to(dtype);
    const ops::NormForward f = ops::group_norm(x, 32, w, b, 1e-6);
    const ops::NormGrads d = ops::group_norm_backward(dy, x, 32, w, f.mean, f.rstd);
    const Run ref = forward_backward([](const Vars& v) { return group_norm_composed(v[0], 32, v[1], v[2], 1e-6); },
                                     {x.to(DType::F64), w.to(DType::F64), b.to(DType::F64)}, dy.to(DType::F64));
    EXPECT_LE(rel_error(f.y, ref.y), tol) << "group_norm forward";
    EXPECT_LE(rel_error(d.dx, ref.grads[0]), tol) << "group_norm dx";
    EXPECT_LE(rel_error(d.dweight, ref.grads[1]), tol) << "group_norm dweight";
    EXPECT_LE(rel_error(d.dbias, ref.grads[2]), tol) << "group_norm dbias";
  }
  {  // GEGLU [7, 2·1283]
    const Tensor x = random_tensor({7, 2 * 1283}, gen).to(dtype), dy = random_tensor({7, 1283}, gen).to(dtype);
    const Tensor y = ops::geglu(x), dx = ops::geglu_backward(dy, x);
    const Run ref =
        forward_backward([](const Vars& v) { return geglu_composed(v[0]); }, {x.to(DType::F64)}, dy.to(DType::F64));
    EXPECT_LE(rel_error(y, ref.y), tol) << "geglu forward";
    EXPECT_LE(rel_error(dx, ref.grads[0]), tol) << "geglu dx";
  }
}

TEST(FusedHalfStorage, Bf16OnTheCpuWithinBf16Rounding) { expect_half_matches(DType::BF16); }
TEST(FusedHalfStorage, F16OnTheCpuWithinF16Rounding) { expect_half_matches(DType::F16); }

// ---- gradients only where asked, errors ------------------------------------------------------

TEST(FusedNorms, FrozenWeightGetsNoGradientAndUndefinedOutputsAreSkipped) {
  Generator gen = fresh_generator("frozen");
  const Tensor x = random_tensor({5, 9}, gen), w = random_tensor({9}, gen), dy = random_tensor({5, 9}, gen);
  const ops::NormForward f = ops::layer_norm(x, 9, w, Tensor(), 1e-5);
  const ops::NormGrads d = ops::layer_norm_backward(dy, x, 9, w, f.mean, f.rstd, {true, false, false});
  EXPECT_TRUE(d.dx.defined());
  EXPECT_FALSE(d.dweight.defined());
  EXPECT_FALSE(d.dbias.defined());
  Variable xv(x, true), wv(w, false), bv(random_tensor({9}, gen), true);
  sum(layer_norm(xv, {9}, wv, bv)).backward();
  EXPECT_TRUE(xv.grad().defined());
  EXPECT_FALSE(wv.grad().defined());
  EXPECT_TRUE(bv.grad().defined());
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

TEST(FusedNorms, BadOperandsAreNamed) {
  const Tensor x = Tensor::zeros({4, 6}, DType::F64);
  EXPECT_THAT(error_of([&] { ops::layer_norm(x, 6, Tensor::ones({5}, DType::F64), Tensor(), 1e-5); }),
              ::testing::HasSubstr("layer_norm: weight"));
  EXPECT_THAT(error_of([&] { ops::layer_norm(x, 6, Tensor::ones({6}, DType::F32), Tensor(), 1e-5); }),
              ::testing::HasSubstr("must have dtype f64"));
  EXPECT_THAT(error_of([&] { ops::group_norm(x, 4, Tensor(), Tensor(), 1e-5); }),
              ::testing::HasSubstr("6 channels cannot be split into 4 groups"));
  EXPECT_THAT(error_of([&] { ops::geglu(Tensor::zeros({3, 5})); }), ::testing::HasSubstr("must be even"));
  EXPECT_THAT(error_of([&] { ops::geglu_backward(Tensor::zeros({3, 3}), Tensor::zeros({3, 8})); }),
              ::testing::HasSubstr("geglu_backward: output gradient"));
}

// A backend that implements only the mandatory methods: its fused slots throw,
// naming the op and the backend.
class BareBackend final : public Backend {
 public:
  const char* name() const override { return "bare"; }
  bool supports(OpKind, DType) const override { return false; }
  void* allocate(size_t, int) override { return nullptr; }
  void deallocate(void*, size_t, int) override {}
  void copy_from_host(void*, const void*, size_t, int) override {}
  void copy_to_host(void*, const void*, size_t, int) override {}
  void synchronize(int) override {}
  void copy(const Tensor&, const Tensor&) override {}
  void fill(const Tensor&, double) override {}
  void unary(UnaryOp, const Tensor&, const Tensor&, double) override {}
  void binary(BinaryOp, const Tensor&, const Tensor&, const Tensor&) override {}
  void reduce(ReduceOp, const Tensor&, const Tensor&, int64_t, int64_t, int64_t) override {}
  void gemm(const GemmBatch&) override {}
  void softmax(const Tensor&, const Tensor&, int64_t, int64_t, bool) override {}
  void im2col(const Tensor&, const Tensor&, const Im2ColArgs&) override {}
  void col2im(const Tensor&, const Tensor&, const Im2ColArgs&) override {}
};

TEST(FusedSlots, ABackendWithoutAKernelSaysSo) {
  BareBackend bare;
  EXPECT_THAT(error_of([&] { bare.layer_norm(LayerNormArgs{}); }),
              ::testing::AllOf(::testing::HasSubstr("layer_norm"), ::testing::HasSubstr("'bare'")));
  EXPECT_THAT(error_of([&] { bare.group_norm_backward(GroupNormGradArgs{}); }),
              ::testing::HasSubstr("group_norm_backward: backend 'bare'"));
  EXPECT_THAT(error_of([&] { bare.geglu(GegluArgs{}); }), ::testing::HasSubstr("geglu: backend 'bare'"));
  EXPECT_THAT(error_of([&] { bare.optimizer_update(OptimizerUpdateArgs{}); }),
              ::testing::HasSubstr("optimizer_update: backend 'bare'"));
  EXPECT_STREQ(op_kind_name(OpKind::OptimizerUpdate), "optimizer_update");
  EXPECT_STREQ(op_kind_name(OpKind::Geglu), "geglu");
}

}  // namespace
}  // namespace loom::test
