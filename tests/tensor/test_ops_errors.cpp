// Tests of loom::ops cat and of the errors promised for bad input (each names the op and what is
// wrong), bf16 / f16 on the CPU (computed in f32, rounded once) and 0-d tensors with a dim
// argument (the conventions of test_ops.cpp).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "tensor/backend.h"
#include "tensor/error.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tensor/tensor.h"
#include "tests/test_helpers.h"

namespace {

using loom::Device;
using loom::DType;
using loom::Generator;
using loom::Shape;
using loom::Tensor;
using testing::HasSubstr;
using loom::testing::error_of;
namespace ops = loom::ops;
using namespace loom::testing::opsref;  // tests/test_helpers.h

// ============================================================================
// cat
// ============================================================================

TEST(OpsCat, ConcatenatesAlongEachDim) {
  Generator gen(6001);
  const Shape base{3, 5, 4};
  for (DType dt : {DType::F32, DType::F64, DType::BF16}) {
    for (int64_t dim : {0, 1, 2, -1, -3}) {
      const int64_t d = dim < 0 ? dim + 3 : dim;
      for (Layout la : kLayouts) {
        SCOPED_TRACE("dim " + std::to_string(dim) + ", " + trace(dt, la));
        std::vector<Input> parts;
        std::vector<Tensor> ts;
        for (int64_t len : {2, 4, 1, 0, 3}) {
          Shape s = base;
          s[size_t(d)] = len;
          parts.push_back(make_input(s, gen, dt, la));
          ts.push_back(parts.back().t);
        }
        const Tensor y = ops::cat(ts, dim);
        Shape out = base;
        out[size_t(d)] = 10;
        ASSERT_EQ(y.shape(), out);
        EXPECT_EQ(y.dtype(), dt);
        std::vector<double> ref(size_t(numel(out)));
        for (int64_t i = 0; i < numel(out); ++i) {
          std::vector<int64_t> idx = unravel(i, out);
          size_t p = 0;
          while (idx[size_t(d)] >= parts[p].t.shape()[size_t(d)]) idx[size_t(d)] -= parts[p++].t.shape()[size_t(d)];
          ref[size_t(i)] = parts[p].ref[size_t(ravel(idx, parts[p].t.shape()))];
        }
        EXPECT_EQ(y.to_vector(), ref);
      }
    }
  }
}

TEST(OpsCat, SingleTensorIsACopy) {
  const Tensor a = Tensor::from_values({1, 2, 3, 4, 5, 6}, {2, 3});
  const Tensor y = ops::cat({a}, 1);
  EXPECT_EQ(y.to_vector(), a.to_vector());
  EXPECT_NE(y.storage(), a.storage());
}

TEST(OpsCat, IncompatibleInputsThrowNamingCat) {
  const Tensor a = Tensor::zeros({2, 3}), b = Tensor::zeros({2, 4});
  EXPECT_THAT(error_of([] { ops::cat({}, 0); }), HasSubstr("cat"));
  const std::string shape_msg = error_of([&] { ops::cat({a, b}, 0); });
  EXPECT_THAT(shape_msg, HasSubstr("cat"));
  EXPECT_THAT(shape_msg, HasSubstr("[2, 4]"));
  EXPECT_THAT(error_of([&] { ops::cat({a, Tensor::zeros({2, 3, 1})}, 0); }), HasSubstr("rank"));
  const std::string dt_msg = error_of([&] { ops::cat({a, Tensor::zeros({2, 3}, DType::F64)}, 0); });
  EXPECT_THAT(dt_msg, HasSubstr("f32"));
  EXPECT_THAT(dt_msg, HasSubstr("f64"));
  EXPECT_THAT(error_of([&] { ops::cat({a, a}, 2); }), HasSubstr("out of range"));
  EXPECT_THAT(error_of([&] { ops::cat({a, Tensor()}, 0); }), HasSubstr("undefined"));
}

// ============================================================================
// Bad input: each error names the op and what is wrong
// ============================================================================

TEST(OpsErrors, AddShapeMismatchNamesBothShapes) {
  const std::string msg = error_of([] { ops::add(Tensor::zeros({2, 3}), Tensor::zeros({4})); });
  EXPECT_THAT(msg, HasSubstr("add"));
  EXPECT_THAT(msg, HasSubstr("[2, 3]"));
  EXPECT_THAT(msg, HasSubstr("[4]"));
}

TEST(OpsErrors, MatmulInnerDimMismatch) {
  const std::string msg = error_of([] { ops::matmul(Tensor::zeros({3, 4}), Tensor::zeros({5, 6})); });
  EXPECT_THAT(msg, HasSubstr("matmul"));
  EXPECT_THAT(msg, HasSubstr("[3, 4]"));
  EXPECT_THAT(msg, HasSubstr("[5, 6]"));
  EXPECT_THAT(error_of([] { ops::matmul(Tensor::zeros({4}), Tensor::zeros({5})); }), HasSubstr("matmul"));
}

TEST(OpsErrors, MatmulBatchMismatchAndZeroDimOperands) {
  EXPECT_THAT(error_of([] { ops::matmul(Tensor::zeros({2, 3, 4}), Tensor::zeros({3, 4, 5})); }),
              HasSubstr("matmul"));
  EXPECT_THAT(error_of([] { ops::matmul(Tensor::scalar(1.0), Tensor::zeros({3, 4})); }), HasSubstr("matmul"));
  EXPECT_THAT(error_of([] { ops::matmul(Tensor::zeros({3, 4}), Tensor::scalar(1.0)); }), HasSubstr("matmul"));
}

TEST(OpsErrors, DtypeMismatchNamesBothDtypes) {
  const Tensor a = Tensor::zeros({2, 3}, DType::F32), b = Tensor::zeros({2, 3}, DType::F64);
  for (const auto& [name, fn] : std::vector<std::pair<std::string, std::function<void()>>>{
           {"add", [&] { ops::add(a, b); }},
           {"maximum", [&] { ops::maximum(b, a); }},
           {"matmul", [&] { ops::matmul(a, b.transpose(0, 1)); }},
           {"linear", [&] { ops::linear(a, b); }},
       }) {
    SCOPED_TRACE(name);
    const std::string msg = error_of(fn);
    EXPECT_THAT(msg, HasSubstr(name));
    EXPECT_THAT(msg, HasSubstr("f32"));
    EXPECT_THAT(msg, HasSubstr("f64"));
  }
}

TEST(OpsErrors, OutOfRangeDimNamesTheOp) {
  const Tensor x = Tensor::zeros({2, 3});
  for (const auto& [name, fn] : std::vector<std::pair<std::string, std::function<void()>>>{
           {"sum", [&] { ops::sum(x, {2}); }},
           {"mean", [&] { ops::mean(x, {-3}); }},
           {"amax", [&] { ops::amax(x, {0, 5}); }},
           {"softmax", [&] { ops::softmax(x, 2); }},
           {"log_softmax", [&] { ops::log_softmax(x, -3); }},
           {"logsumexp", [&] { ops::logsumexp(x, 2); }},
           {"cat", [&] { ops::cat({x, x}, -3); }},
       }) {
    SCOPED_TRACE(name);
    const std::string msg = error_of(fn);
    EXPECT_THAT(msg, HasSubstr("out of range"));
    EXPECT_THAT(msg, HasSubstr(name));
  }
}

TEST(OpsErrors, RepeatedReductionDimThrows) {
  const Tensor x = Tensor::zeros({2, 3});
  EXPECT_THAT(error_of([&] { ops::sum(x, {1, -1}); }), HasSubstr("repeated"));
  EXPECT_THAT(error_of([&] { ops::amax(x, {0, 0}); }), HasSubstr("repeated"));
}

TEST(OpsErrors, UndefinedOperandThrows) {
  const Tensor x = Tensor::zeros({2});
  EXPECT_THAT(error_of([&] { ops::add(x, Tensor()); }), HasSubstr("undefined"));
  EXPECT_THAT(error_of([&] { ops::exp(Tensor()); }), HasSubstr("undefined"));
  EXPECT_THAT(error_of([&] { ops::sum(Tensor()); }), HasSubstr("undefined"));
  EXPECT_THAT(error_of([&] { ops::softmax(Tensor(), 0); }), HasSubstr("undefined"));
}

// The CPU backend computes in f32 and f64 only: every op on bf16, f16 or i64 CPU
// tensors throws, naming the op, the device and the dtype.
struct NamedOp {
  std::string name;
  std::function<void(const Tensor&)> fn;  // x has shape [3, 4]
};

std::vector<NamedOp> kernel_ops() {
  return {
      {"add", [](const Tensor& x) { ops::add(x, x); }},
      {"sub", [](const Tensor& x) { ops::sub(x, x); }},
      {"mul", [](const Tensor& x) { ops::mul(x, x); }},
      {"div", [](const Tensor& x) { ops::div(x, x); }},
      {"maximum", [](const Tensor& x) { ops::maximum(x, x); }},
      {"minimum", [](const Tensor& x) { ops::minimum(x, x); }},
      {"add_scalar", [](const Tensor& x) { ops::add_scalar(x, 1.0); }},
      {"mul_scalar", [](const Tensor& x) { ops::mul_scalar(x, 2.0); }},
      {"pow", [](const Tensor& x) { ops::pow_scalar(x, 2.0); }},
      {"neg", [](const Tensor& x) { ops::neg(x); }},
      {"exp", [](const Tensor& x) { ops::exp(x); }},
      {"log", [](const Tensor& x) { ops::log(x); }},
      {"sqrt", [](const Tensor& x) { ops::sqrt(x); }},
      {"rsqrt", [](const Tensor& x) { ops::rsqrt(x); }},
      {"tanh", [](const Tensor& x) { ops::tanh(x); }},
      {"sigmoid", [](const Tensor& x) { ops::sigmoid(x); }},
      {"relu", [](const Tensor& x) { ops::relu(x); }},
      {"step", [](const Tensor& x) { ops::step(x); }},
      {"gelu", [](const Tensor& x) { ops::gelu(x); }},
      {"gelu_grad", [](const Tensor& x) { ops::gelu_grad(x, true); }},
      {"abs", [](const Tensor& x) { ops::abs(x); }},
      {"square", [](const Tensor& x) { ops::square(x); }},
      {"reciprocal", [](const Tensor& x) { ops::reciprocal(x); }},
      {"sum", [](const Tensor& x) { ops::sum(x, {1}); }},
      {"amax", [](const Tensor& x) { ops::amax(x); }},
      {"matmul", [](const Tensor& x) { ops::matmul(x, x.transpose(0, 1)); }},
      {"softmax", [](const Tensor& x) { ops::softmax(x, 1); }},
      {"log_softmax", [](const Tensor& x) { ops::log_softmax(x, 0); }},
  };
}

// bf16 / f16 on the CPU: stored in the low precision, computed in f32 (tensor/precision.h), so
// the result is the f32 result rounded once.
TEST(OpsBf16OnCpu, ComputedInF32AndRoundedOnce) {
  const Tensor x = Tensor::from_values({0.5, 1.0, 1.5, -2.0, 3.0}, {5}, DType::BF16);
  const Tensor y = ops::exp(x);
  EXPECT_EQ(y.dtype(), DType::BF16);
  EXPECT_EQ(y.to_vector(), ops::exp(x.to(DType::F32)).to(DType::BF16).to_vector());
  const Tensor a = Tensor::from_values({1, 2, 3, 4, 5, 6}, {2, 3}, DType::F16);
  const Tensor b = Tensor::from_values({0.5, -1, 2, 0.25, 3, -2}, {3, 2}, DType::F16);
  EXPECT_EQ(ops::matmul(a, b).to_vector(),
            ops::matmul(a.to(DType::F32), b.to(DType::F32)).to(DType::F16).to_vector());
}

TEST(OpsBf16OnCpu, EveryKernelOpRunsOnBf16AndF16) {
  for (DType dt : {DType::BF16, DType::F16}) {
    const Tensor x = Tensor::ones({3, 4}, dt);
    for (const NamedOp& op : kernel_ops()) {
      SCOPED_TRACE(op.name + " on " + loom::dtype_name(dt));
      EXPECT_EQ(error_of([&] { op.fn(x); }), "<no error>");
    }
  }
}

TEST(OpsErrors, EveryKernelOpOnI64CpuTensorsNamesOpDeviceAndDtype) {
  for (DType dt : {DType::I64}) {
    const Tensor x = Tensor::ones({3, 4}, dt);
    for (const NamedOp& op : kernel_ops()) {
      SCOPED_TRACE(op.name + " on " + loom::dtype_name(dt));
      const std::string msg = error_of([&] { op.fn(x); });
      EXPECT_THAT(msg, HasSubstr(op.name + ":"));
      EXPECT_THAT(msg, HasSubstr("cpu"));
      EXPECT_THAT(msg, HasSubstr(loom::dtype_name(dt)));
    }
  }
}

// Ops composed of other ops must still name themselves (ops.h: "throws
// loom::Error naming the op"), not the inner op the user never called.
TEST(OpsErrors, CompositeOpsNameThemselvesOnUnsupportedDtype) {
  const Tensor x = Tensor::ones({3, 4}, DType::I64);
  for (const NamedOp& op : std::vector<NamedOp>{
           {"mean", [](const Tensor& t) { ops::mean(t, {1}); }},
           {"logsumexp", [](const Tensor& t) { ops::logsumexp(t, 1); }},
           {"linear", [](const Tensor& t) { ops::linear(t, Tensor::ones({2, 4}, DType::I64)); }},
           {"sum_to", [](const Tensor& t) { ops::sum_to(t, {1, 4}); }},
       }) {
    SCOPED_TRACE(op.name);
    const std::string msg = error_of([&] { op.fn(x); });
    EXPECT_THAT(msg, HasSubstr("i64"));
    EXPECT_THAT(msg, HasSubstr("cpu"));
    EXPECT_THAT(msg, HasSubstr(op.name));
  }
}

TEST(OpsErrors, CatAndCopiesStillWorkForBf16OnCpu) {
  // copy kernels exist for every dtype, so cat must not be refused
  const Tensor a = Tensor::from_values({1, 2, 3}, {3}, DType::BF16);
  const Tensor b = Tensor::from_values({-0.5, 8}, {2}, DType::BF16);
  const Tensor y = ops::cat({a, b}, 0);
  EXPECT_EQ(y.dtype(), DType::BF16);
  EXPECT_EQ(y.to_vector(), (std::vector<double>{1, 2, 3, -0.5, 8}));
}

// ============================================================================
// 0-d tensors with a dim argument (wrap_dim accepts 0 / -1 for rank 0): the op
// must give the 0-d answer or throw, not index the empty shape. Run in a child
// process so that a crash fails only this test.
// ============================================================================

TEST(OpsScalarDims, LogsumexpOfZeroDimTensorIsTheValueOrThrows) {
  LOOM_EXPECT_CHILD_EXITS_0({
    try {
      const Tensor r = ops::logsumexp(Tensor::scalar(1.5, DType::F64), 0);
      std::_Exit(r.dim() == 0 && std::abs(r.item() - 1.5) < 1e-12 ? 0 : 3);
    } catch (const loom::Error&) {
      std::_Exit(0);
    }
  });
}

TEST(OpsScalarDims, CatOfZeroDimTensorsThrowsInsteadOfCrashing) {
  LOOM_EXPECT_CHILD_EXITS_0({
    try {
      (void)ops::cat({Tensor::scalar(1.0), Tensor::scalar(2.0)}, 0);
    } catch (const loom::Error&) {
      std::_Exit(0);
    }
    std::_Exit(3);
  });
}

TEST(OpsScalarDims, SoftmaxAndReductionsOfZeroDimTensor) {
  const Tensor s = Tensor::scalar(-4.0, DType::F64);
  EXPECT_EQ(ops::softmax(s, 0).item(), 1.0);
  EXPECT_EQ(ops::log_softmax(s, -1).item(), 0.0);
  EXPECT_EQ(ops::sum(s, {0}).item(), -4.0);
  EXPECT_EQ(ops::amax(s, {-1}, true).shape(), Shape{});
}

}  // namespace
