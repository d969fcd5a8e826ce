// CUDA graph steps where there is no GPU (trainer/step_graph.h, tensor/graph.h): on the CPU a
// run with cuda_graph on computes exactly what it computes with it off, replays nothing and says
// nothing about graphs; the device-neutral graph interface refuses the CPU with a clear error;
// PinnedUpload is a plain copy there. The GPU side is tests/gpu/test_gpu_graph.cpp.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <sstream>

#include "tensor/graph.h"
#include "tests/test_helpers.h"
#include "tests/trainer/graph_training.h"

namespace loom {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing::TempDir;

TEST(StepGraph, CpuRunsAreTheSameWithAndWithoutCudaGraphAndReplayNothing) {
  TempDir dir;
  const auto on = testing::run_graph_test_training(testing::graph_test_options(dir / "on", "cpu", "f32", true));
  const auto off = testing::run_graph_test_training(testing::graph_test_options(dir / "off", "cpu", "f32", false));
  ASSERT_EQ(on.result.losses.size(), 10u);
  EXPECT_EQ(on.result.losses, off.result.losses);
  EXPECT_FALSE(on.adapter.empty());
  EXPECT_EQ(on.adapter, off.adapter);
  EXPECT_EQ(on.result.graph_replays, 0);
  EXPECT_EQ(off.result.graph_replays, 0);
  EXPECT_THAT(on.log, Not(HasSubstr("CUDA graph")));
  EXPECT_LT(on.result.losses.back(), on.result.losses.front());  // it trained
}

TEST(StepGraph, GradAccumulationOnTheCpuIsUnchangedByTheOption) {
  TempDir dir;
  auto a = testing::graph_test_options(dir / "on", "cpu", "f32", true);
  auto b = testing::graph_test_options(dir / "off", "cpu", "f32", false);
  a.grad_accum = b.grad_accum = 2, a.max_grad_norm = b.max_grad_norm = 0.5;
  const auto on = testing::run_graph_test_training(a), off = testing::run_graph_test_training(b);
  EXPECT_EQ(on.result.losses, off.result.losses);
  EXPECT_EQ(on.adapter, off.adapter);
}

TEST(StepGraph, DeviceGraphRefusesTheCpuNamingIt) {
  EXPECT_FALSE(device_graphs_supported(Device::cpu()));
  EXPECT_THAT(testing::error_of([] { DeviceGraph g(Device::cpu()); }), HasSubstr("not supported on device cpu"));
}

TEST(StepGraph, DeviceGraphOnAMissingCudaDeviceIsAnError) {
  const Device missing = Device::cuda(cuda_device_count());  // one past the last (cuda:0 without a GPU)
  EXPECT_FALSE(device_graphs_supported(missing));
  EXPECT_THAT(testing::error_of([&] { DeviceGraph g(missing); }), HasSubstr("not supported on device cuda"));
}

TEST(StepGraph, PinnedUploadToACpuTensorIsACopy) {
  Generator gen(1);
  const Tensor src = Tensor::randn({3, 4}, gen);
  const Tensor dst = Tensor::empty({3, 4}, DType::F32, Device::cpu());
  PinnedUpload up;
  up.copy(dst, src);
  EXPECT_EQ(dst.to_vector(), src.to_vector());
  EXPECT_THAT(testing::error_of([&] { up.copy(Tensor::empty({2}, DType::F32, Device::cpu()), src); }),
              HasSubstr("differ in shape"));
}

}  // namespace
}  // namespace loom
