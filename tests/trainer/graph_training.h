// A small training run of a Transformer2DModel block through trainer::train, shared by the CPU
// (tests/trainer/test_step_graph.cpp) and GPU (tests/gpu/test_gpu_graph.cpp) tests of CUDA
// graph steps: the same seeded model and data, run with given options, and what to compare.
#pragma once

#include <map>
#include <sstream>
#include <memory>
#include <string>
#include <vector>

#include "adapters/lora.h"
#include "attention/transformer.h"
#include "tensor/random.h"
#include "trainer/trainer.h"

namespace loom::testing {

// Sizes not multiples of any tile: 6 channels, 5×3 pixels, a context of 7 tokens of width 10.
inline attention::Transformer2DConfig graph_test_config() {
  attention::Transformer2DConfig c;
  c.in_channels = 6;
  c.num_attention_heads = 2;
  c.attention_head_dim = 3;
  c.norm_num_groups = 3;
  c.cross_attention_dim = 10;
  return c;
}

inline trainer::DataSet graph_test_data() {
  Generator gen(11);
  trainer::DataSet d;
  d.hidden_states = Tensor::randn({4, 6, 5, 3}, gen);
  d.encoder_hidden_states = Tensor::randn({4, 7, 10}, gen);
  d.target = Tensor::randn({4, 6, 5, 3}, gen);
  return d;
}

struct GraphTestRun {
  trainer::TrainResult result;
  std::map<std::string, std::vector<double>> adapter;  // the trained adapter weights, by name
  std::string log;
};

// Trains a fresh seeded model with `o` (out_dir must be set); the trained LoRA weights are read
// back afterwards.
inline GraphTestRun run_graph_test_training(const trainer::TrainOptions& o) {
  Generator gen(5);
  auto model = std::make_shared<attention::Transformer2DModel>(graph_test_config(), gen);
  std::ostringstream log;
  GraphTestRun run;
  run.result = trainer::train(model, graph_test_data(), o, log);
  if (run.result.lora)
    for (const auto& [name, p] : run.result.lora->trainable_parameters()) run.adapter[name] = p.tensor().to_vector();
  run.log = log.str();
  return run;
}

// The options of the runs: AdamW, 10 steps of batch 2 at lr 1e-2, seeded.
inline trainer::TrainOptions graph_test_options(const std::string& out_dir, const std::string& device,
                                                const std::string& precision, bool cuda_graph) {
  trainer::TrainOptions o;
  o.out_dir = out_dir, o.device = device, o.precision = precision, o.cuda_graph = cuda_graph;
  o.steps = 10, o.batch_size = 2, o.lr = 1e-2, o.seed = 3, o.rank = 2;
  return o;
}

}  // namespace loom::testing
