// CUDA graphs on cuda:0 (tensor/graph.h, tensor/cuda/cuda_graph.cu, the private pools of
// tensor/cuda/cuda_allocator.h, trainer/step_graph.h, the UNet objective's split in
// trainer/diffusion_objective.cpp). Every test skips without a GPU.
//
// The training runs compare a run that replays a captured graph with an eager run of the same
// seed: the graph replays the very kernels, with the same arguments, on the same inputs, so the
// losses and the trained weights are expected to be equal bit for bit. The comparison allows a
// relative 1e-6 (f32) / 1e-5 (bf16) all the same, in case a kernel accumulates with atomics in an
// order that differs between any two runs (eager ones included); the report prints the largest
// difference found so that a non-zero one is seen.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <ostream>
#include <sstream>

#include "tensor/cuda/cuda_allocator.h"
#include "tensor/graph.h"
#include "tensor/ops.h"
#include "tensor/random.h"
#include "tests/test_helpers.h"
#include "tests/trainer/graph_training.h"
#include "trainer/diffusion_objective.h"
#include "unet/unet_io.h"

namespace loom {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;

// ---- the allocator's private pools --------------------------------------------------------------

TEST(GpuGraphPool, BlocksOfAPoolAreReusedInsideItAndNeverHandedOutside) {
  LOOM_SKIP_WITHOUT_CUDA();
  const size_t kBytes = 3 << 20;  // a size no other test of this process holds cached
  const CudaAllocatorStats before = cuda_allocator_stats(0);
  const uint64_t pool = cuda::create_graph_pool(0);
  EXPECT_EQ(cuda_allocator_stats(0).graph_pools, before.graph_pools + 1);

  cuda::begin_graph_pool_allocation(0, pool);
  EXPECT_TRUE(cuda::graph_pool_active(0));
  void* a = cuda::cached_malloc(kBytes, 0);
  cuda::cached_free(a, kBytes, 0);
  void* b = cuda::cached_malloc(kBytes, 0);  // inside the capture: the freed block is reused
  EXPECT_EQ(b, a);
  void* c = cuda::cached_malloc(kBytes, 0);
  cuda::cached_free(c, kBytes, 0);  // c stays in the pool, free
  cuda::end_graph_pool_allocation(0);
  EXPECT_FALSE(cuda::graph_pool_active(0));

  const CudaAllocatorStats during = cuda_allocator_stats(0);
  EXPECT_GE(during.bytes_in_graph_pools, before.bytes_in_graph_pools + 2 * kBytes);
  EXPECT_EQ(during.bytes_in_use, before.bytes_in_use + kBytes);  // b
  EXPECT_GE(during.bytes_cached, before.bytes_cached + kBytes);   // c, cached in the pool

  // Outside the capture, neither the free block c nor b (once freed) goes to anyone else.
  void* d = cuda::cached_malloc(kBytes, 0);
  EXPECT_NE(d, c);
  cuda::cached_free(b, kBytes, 0);
  void* e = cuda::cached_malloc(kBytes, 0);
  EXPECT_NE(e, b);
  EXPECT_NE(e, c);

  // Released: the pool's blocks serve everyone again.
  cuda::release_graph_pool(0, pool);
  const CudaAllocatorStats after = cuda_allocator_stats(0);
  EXPECT_EQ(after.graph_pools, before.graph_pools);
  EXPECT_EQ(after.bytes_in_graph_pools, before.bytes_in_graph_pools);
  void* f = cuda::cached_malloc(kBytes, 0);
  void* g = cuda::cached_malloc(kBytes, 0);
  EXPECT_TRUE((f == b || f == c) && (g == b || g == c) && f != g);
  for (void* p : {d, e, f, g}) cuda::cached_free(p, kBytes, 0);
  EXPECT_EQ(cuda_allocator_stats(0).bytes_in_use, before.bytes_in_use);
}

TEST(GpuGraphPool, BlocksFreedDuringACaptureJoinThePoolAndCachedOnesAreTakenIn) {
  LOOM_SKIP_WITHOUT_CUDA();
  const size_t kBytes = 5 << 20;
  void* outside = cuda::cached_malloc(kBytes, 0);  // allocated before the capture
  void* cached = cuda::cached_malloc(kBytes, 0);
  cuda::cached_free(cached, kBytes, 0);  // in the device's cache
  const uint64_t pool = cuda::create_graph_pool(0);
  cuda::begin_graph_pool_allocation(0, pool);
  void* taken = cuda::cached_malloc(kBytes, 0);  // the device's cached block, now the pool's
  EXPECT_EQ(taken, cached);
  cuda::cached_free(outside, kBytes, 0);  // freed during the capture: joins the pool
  cuda::end_graph_pool_allocation(0);
  void* eager = cuda::cached_malloc(kBytes, 0);
  EXPECT_NE(eager, outside);
  EXPECT_NE(eager, taken);
  EXPECT_GE(cuda_allocator_stats(0).bytes_in_graph_pools, 2 * kBytes);
  cuda::cached_free(taken, kBytes, 0);
  cuda::cached_free(eager, kBytes, 0);
  cuda::release_graph_pool(0, pool);
  EXPECT_THAT(testing::error_of([] { cuda::begin_graph_pool_allocation(0, 987654321); }), HasSubstr("no pool"));
}

// ---- capture and replay ------------------------------------------------------------------------

TEST(GpuGraph, ReplayRecomputesFromRefilledInputsIntoTheSameOutput) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(2);
  const Device cuda = Device::cuda(0);
  const Tensor x = Tensor::empty({37, 19}, DType::F32, cuda);
  Tensor y;
  DeviceGraph graph(cuda);
  graph.capture([&] { y = ops::add_scalar(ops::mul(ops::exp(x), x), 1.0); });
  EXPECT_TRUE(graph.captured());
  for (int i = 0; i < 3; ++i) {
    const Tensor host = Tensor::randn({37, 19}, gen);
    PinnedUpload up;
    up.copy(x, host);
    graph.replay();
    const Tensor expected = ops::add_scalar(ops::mul(ops::exp(host), host), 1.0);
    EXPECT_LT(testing::rel_error(y.to(Device::cpu()), expected), 1e-6) << "replay " << i;
  }
}

TEST(GpuGraph, AHostReadDuringCaptureFailsClearlyAndLeavesTheDeviceUsable) {
  LOOM_SKIP_WITHOUT_CUDA();
  const Device cuda = Device::cuda(0);
  const Tensor x = Tensor::ones({8}, DType::F32, cuda);
  {
    DeviceGraph graph(cuda);
    const std::string err = testing::error_of([&] { graph.capture([&] { (void)ops::sum(x).item(); }); });
    EXPECT_THAT(err, HasSubstr("cuda"));
    EXPECT_FALSE(graph.captured());
    EXPECT_THAT(testing::error_of([&] { graph.replay(); }), HasSubstr("before a successful capture"));
    EXPECT_FALSE(cuda::graph_pool_active(0));
  }
  EXPECT_EQ(ops::sum(ops::mul_scalar(x, 2.0)).item(), 16.0);  // eager work goes on
}

TEST(GpuGraph, PinnedUploadConvertsOnTheHostAndChecksShapes) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen(4);
  const Tensor src = Tensor::randn({3, 129}, gen);
  const Tensor dst = Tensor::empty({3, 129}, DType::F32, Device::cuda(0));
  PinnedUpload up;
  for (int i = 0; i < 2; ++i) up.copy(dst, src);  // the second copy waits for the first
  EXPECT_EQ(dst.to(Device::cpu()).to_vector(), src.to_vector());
  EXPECT_THAT(testing::error_of([&] { up.copy(dst, src.to(Device::cuda(0))); }), HasSubstr("must be on the CPU"));
}

// ---- training: a graph run equals the eager run -------------------------------------------------

double max_rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::abs(a[i] - b[i]) / std::max(std::abs(b[i]), 1e-12));
  return worst;
}

struct GraphCase {
  const char* precision;
  int64_t grad_accum;
  double max_grad_norm;
  double tolerance;
};

void PrintTo(const GraphCase& c, std::ostream* os) {
  *os << c.precision << " accum " << c.grad_accum << " clip " << c.max_grad_norm;
}

class GpuGraphTraining : public ::testing::TestWithParam<GraphCase> {};

TEST_P(GpuGraphTraining, ReplayedStepsGiveTheEagerLossesAndWeights) {
  LOOM_SKIP_WITHOUT_CUDA();
  const GraphCase c = GetParam();
  TempDir dir;
  auto graph_options = testing::graph_test_options(dir / "graph", "cuda", c.precision, true);
  auto eager_options = testing::graph_test_options(dir / "eager", "cuda", c.precision, false);
  for (auto* o : {&graph_options, &eager_options}) o->grad_accum = c.grad_accum, o->max_grad_norm = c.max_grad_norm;
  const auto graph = testing::run_graph_test_training(graph_options);
  const auto eager = testing::run_graph_test_training(eager_options);

  EXPECT_THAT(graph.log, HasSubstr("CUDA graphs on"));
  EXPECT_THAT(eager.log, HasSubstr("CUDA graphs off (--no-cuda-graph)"));
  EXPECT_THAT(graph.log, ::testing::Not(HasSubstr("capture failed")));
  EXPECT_EQ(graph.result.graph_replays, (10 - trainer::kGraphWarmupSteps) * c.grad_accum);  // the graph was used
  EXPECT_EQ(eager.result.graph_replays, 0);
  ASSERT_EQ(graph.result.losses.size(), 10u);
  ASSERT_EQ(graph.adapter.size(), eager.adapter.size());
  ASSERT_FALSE(graph.adapter.empty());

  const double loss_diff = max_rel_diff(graph.result.losses, eager.result.losses);
  double weight_diff = 0;
  for (const auto& [name, w] : eager.adapter) weight_diff = std::max(weight_diff, max_rel_diff(graph.adapter.at(name), w));
  std::printf("[ graph vs eager ] %s accum %lld clip %g: max relative difference: losses %.3g, weights %.3g\n",
              c.precision, static_cast<long long>(c.grad_accum), c.max_grad_norm, loss_diff, weight_diff);
  EXPECT_LE(loss_diff, c.tolerance);
  EXPECT_LE(weight_diff, c.tolerance);
  EXPECT_LT(graph.result.losses.back(), graph.result.losses.front());  // and it trained
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuGraphTraining,
                         ::testing::Values(GraphCase{"f32", 1, 0.0, 1e-6}, GraphCase{"f32", 2, 0.5, 1e-6},
                                           GraphCase{"tf32", 1, 1.0, 1e-5}, GraphCase{"bf16", 1, 0.0, 1e-5},
                                           GraphCase{"bf16", 3, 1.0, 1e-5}),
                         [](const auto& info) {
                           return std::string(info.param.precision) + "_accum" +
                                  std::to_string(info.param.grad_accum) + (info.param.max_grad_norm > 0 ? "_clip" : "");
                         });

// The whole UNet with the diffusion objective (drawn noise and timesteps): sd1 in f32 with min-SNR
// weights and accumulation, SDXL (text_time) in bf16.
struct UNetGraphCase {
  const char* fixture;
  const char* precision;
  int64_t grad_accum;
  double tolerance;
};

void PrintTo(const UNetGraphCase& c, std::ostream* os) { *os << c.fixture << " " << c.precision; }

class GpuGraphUNetTraining : public ::testing::TestWithParam<UNetGraphCase> {};

TEST_P(GpuGraphUNetTraining, ReplayedStepsGiveTheEagerLossesAndWeights) {
  LOOM_SKIP_WITHOUT_CUDA();
  const UNetGraphCase c = GetParam();
  const std::string dir = std::string(LOOM_UNET_FIXTURE_DIR) + "/" + c.fixture;
  const bool sdxl = std::string(c.fixture) == "sdxl";
  Generator gen(4);
  trainer::DiffusionData d;
  d.latents = Tensor::randn({4, 4, 8, 8}, gen);
  d.encoder_hidden_states = Tensor::randn({4, sdxl ? 3 : 5, 12}, gen);
  if (sdxl) {
    d.text_embeds = Tensor::randn({4, 8}, gen);
    d.time_ids = Tensor::from_values({64, 80, 0, 0, 64, 80, 32, 48, 4, 2, 32, 40, 64, 80, 0, 0, 64, 80, 32, 48, 4, 2,
                                      32, 40},
                                     {4, 6});
  }
  TempDir tmp;
  struct Run {
    trainer::TrainResult result;
    std::map<std::string, std::vector<double>> adapter;
    std::string log;
  };
  auto run = [&](bool graphs) {
    auto model = unet::load_unet_dir(dir).model;
    trainer::TrainOptions o;
    o.out_dir = tmp / (graphs ? "graph" : "eager"), o.steps = 8, o.rank = 2, o.lr = 1e-2, o.batch_size = 2;
    o.device = "cuda", o.precision = c.precision, o.max_grad_norm = 1.0, o.grad_accum = c.grad_accum;
    o.cuda_graph = graphs, o.diffusion.enabled = true;
    if (!sdxl) o.diffusion.snr_gamma = 5.0;
    std::ostringstream log;
    Run r;
    r.result = trainer::train_unet(model, d, o, log);
    if (r.result.lora)
      for (const auto& [name, p] : r.result.lora->trainable_parameters()) r.adapter[name] = p.tensor().to_vector();
    r.log = log.str();
    return r;
  };
  const Run graph = run(true), eager = run(false);
  EXPECT_THAT(graph.log, HasSubstr("CUDA graphs on"));
  EXPECT_THAT(graph.log, ::testing::Not(HasSubstr("capture failed")));
  EXPECT_EQ(graph.result.graph_replays, (8 - trainer::kGraphWarmupSteps) * c.grad_accum);
  ASSERT_EQ(graph.result.losses.size(), 8u);
  ASSERT_FALSE(graph.adapter.empty());
  const double loss_diff = max_rel_diff(graph.result.losses, eager.result.losses);
  double weight_diff = 0;
  for (const auto& [name, w] : eager.adapter) weight_diff = std::max(weight_diff, max_rel_diff(graph.adapter.at(name), w));
  std::printf("[ graph vs eager ] UNet %s %s accum %lld: max relative difference: losses %.3g, weights %.3g\n",
              c.fixture, c.precision, static_cast<long long>(c.grad_accum), loss_diff, weight_diff);
  EXPECT_LE(loss_diff, c.tolerance);
  EXPECT_LE(weight_diff, c.tolerance);
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuGraphUNetTraining,
                         ::testing::Values(UNetGraphCase{"sd1", "f32", 2, 1e-6}, UNetGraphCase{"sdxl", "bf16", 1, 1e-5}),
                         [](const auto& info) { return std::string(info.param.fixture) + "_" + info.param.precision; });

TEST(GpuGraphTrainingEager, F16LossScalingStaysEagerAndSaysWhy) {
  LOOM_SKIP_WITHOUT_CUDA();
  TempDir dir;
  const auto run = testing::run_graph_test_training(testing::graph_test_options(dir / "f16", "cuda", "f16", true));
  EXPECT_EQ(run.result.graph_replays, 0);
  EXPECT_THAT(run.log, HasSubstr("CUDA graphs off (precision f16"));
}

}  // namespace
}  // namespace loom
