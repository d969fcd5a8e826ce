// Every differentiable op of the harness run on CUDA and compared with the CPU
// in f64, forward and all input gradients, on fresh random inputs
// (ctest -L gpu). f32: relative error ≤ 1e-5; bf16: ≤ 1e-2 (against the f64
// result on the same bf16-rounded inputs), or twice the error of the same op run
// in bf16 on the CPU where that is larger: the bf16 rounding of an intermediate
// (softmax's output, say) can alone exceed 1e-2 after cancellation, and no
// kernel can do better than its inputs. Skips, with the reason, without a GPU.
#include <gtest/gtest.h>

#include <cmath>

#include "autograd/op_cases.h"
#include "tensor/backend.h"
#include "tests/test_helpers.h"

namespace loom::test {
using namespace loom::cases;
namespace {

using loom::testing::rel_error;
struct RunResult {
  Tensor out;
  std::vector<Tensor> grads;
};

// Forward and backward with the given upstream gradient (values in f64, moved to dtype/device).
RunResult run_case(const OpCase& c, const std::vector<Variable>& inputs, const std::vector<double>& upstream) {
  RunResult r;
  const Variable out = c.fn(inputs);
  r.out = out.tensor();
  out.backward(Tensor::from_values(upstream, out.shape(), out.dtype(), out.device()));
  for (const Variable& v : inputs) r.grads.push_back(v.grad());
  return r;
}

void compare_on_gpu(const OpCase& c, DType dtype, double tol) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(::testing::UnitTest::GetInstance()->random_seed() * 7919 + std::hash<std::string>{}(c.name()));
  const std::vector<Variable> gpu_in = make_inputs(c, gen, dtype, Device::cuda(0));
  std::vector<Variable> ref_in;  // the very values the GPU got, in f64 on the CPU
  for (size_t i = 0; i < gpu_in.size(); ++i)
    ref_in.emplace_back(gpu_in[i].tensor().to(Device::cpu()).to(DType::F64), c.inputs[i].requires_grad);

  Variable probe;
  {
    NoGradGuard ng;
    probe = c.fn(ref_in);
  }
  std::vector<double> upstream(size_t(probe.numel()));
  for (double& u : upstream) u = gen.normal();
  const Tensor rounded_up = Tensor::from_values(upstream, probe.shape(), dtype).to(DType::F64);
  upstream = rounded_up.to_vector();

  const RunResult ref = run_case(c, ref_in, upstream);
  const RunResult gpu = run_case(c, gpu_in, upstream);
  ASSERT_EQ(gpu.out.device(), Device::cuda(0)) << c.name();
  ASSERT_EQ(gpu.out.dtype(), dtype) << c.name();

  // The same op in the same dtype on the CPU: its error against f64 is what rounding alone costs.
  RunResult cpu_same_dtype;
  if (dtype != DType::F32) {
    std::vector<Variable> cpu_in;
    for (size_t i = 0; i < gpu_in.size(); ++i)
      cpu_in.emplace_back(gpu_in[i].tensor().to(Device::cpu()), c.inputs[i].requires_grad);
    cpu_same_dtype = run_case(c, cpu_in, upstream);
  }
  auto bound = [&](const Tensor& cpu_result, const Tensor& f64_result) {
    return cpu_result.defined() ? std::max(tol, 2 * rel_error(cpu_result, f64_result)) : tol;
  };
  EXPECT_LE(rel_error(gpu.out, ref.out), bound(cpu_same_dtype.out, ref.out)) << c.name() << " forward";
  for (size_t i = 0; i < gpu_in.size(); ++i) {
    if (!c.inputs[i].requires_grad) {
      EXPECT_FALSE(gpu.grads[i].defined()) << c.name() << " frozen input " << i << " got a gradient";
      continue;
    }
    ASSERT_TRUE(gpu.grads[i].defined()) << c.name() << " input " << i;
    EXPECT_EQ(gpu.grads[i].device(), Device::cuda(0));
    const Tensor cpu_grad = cpu_same_dtype.grads.empty() ? Tensor() : cpu_same_dtype.grads[i];
    EXPECT_LE(rel_error(gpu.grads[i], ref.grads[i]), bound(cpu_grad, ref.grads[i]))
        << c.name() << " gradient of input " << i;
  }
}

class GpuOp : public ::testing::TestWithParam<size_t> {};

TEST_P(GpuOp, F32MatchesCpuF64) { compare_on_gpu(op_cases()[GetParam()], DType::F32, 1e-5); }

TEST_P(GpuOp, BF16MatchesCpuF64) {
  const OpCase& c = op_cases()[GetParam()];
  if (!c.bf16) GTEST_SKIP() << c.name() << " is not compared in bf16";
  compare_on_gpu(c, DType::BF16, 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Ops, GpuOp, ::testing::Range(size_t(0), op_cases().size()),
                         [](const ::testing::TestParamInfo<size_t>& info) { return op_cases()[info.param].name(); });

}  // namespace
}  // namespace loom::test
