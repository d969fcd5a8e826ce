// The fused multi-tensor optimizer update (ops::optimizer_update, the Backend's
// OptimizerUpdate slot) against optim/'s former per-tensor op chains
// (tests/common/fused_reference.h), over lists of odd-sized tensors for several
// steps: bit for bit in f64, within 1e-6 in f32. Also: the optimizers' own
// semantics that the fused path must keep (non-contiguous parameters, state
// snapshots). This file is compiled with -ffp-contract=off so that the host-side
// scalars round as in the library.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "optim/optim.h"
#include "tensor/ops_fused.h"
#include "tests/common/fused_reference.h"

namespace loom::test {
namespace {

const std::vector<int64_t> kSizes = {1, 7, 333, 1283, 40 * 33, 5};

struct Config {
  std::string name;
  OptimizerUpdateArgs args;
};

std::vector<Config> configs() {
  std::vector<Config> c;
  OptimizerUpdateArgs a;
  a.kind = OptimizerKind::Sgd, a.lr = 0.05;
  c.push_back({"sgd_plain", a});
  a.momentum = 0.9, a.dampening = 0.1, a.weight_decay = 0.01;
  c.push_back({"sgd_momentum_dampening_decay", a});
  a.dampening = 0.0, a.nesterov = true;
  c.push_back({"sgd_nesterov_decay", a});
  OptimizerUpdateArgs b;
  b.kind = OptimizerKind::Adam, b.lr = 0.01, b.beta1 = 0.8, b.beta2 = 0.99, b.eps = 1e-6, b.weight_decay = 0.1;
  c.push_back({"adam_l2", b});
  b.kind = OptimizerKind::AdamW;
  c.push_back({"adamw", b});
  b.weight_decay = 0.0;
  c.push_back({"adamw_no_decay", b});
  return c;
}

// Three steps of `cfg` over tensors of kSizes in `dtype`: the fused call on one
// copy of the state, the reference chain on another; compared after every step.
void run_config(const Config& cfg, DType dtype, double tol) {
  Generator gen(std::hash<std::string>{}(cfg.name) ^ ::testing::UnitTest::GetInstance()->random_seed());
  std::vector<OptimizerTensor> fused, ref;
  for (int64_t n : kSizes) {
    OptimizerTensor e;
    e.param = random_tensor({n}, gen, dtype);
    if (cfg.args.kind == OptimizerKind::Sgd) {
      if (cfg.args.momentum != 0) e.state1 = Tensor::zeros({n}, dtype);
    } else {
      e.state1 = Tensor::zeros({n}, dtype);
      e.state2 = Tensor::zeros({n}, dtype);
    }
    fused.push_back(e);
    OptimizerTensor r = e;
    r.param = e.param.clone();
    if (e.state1.defined()) r.state1 = e.state1.clone();
    if (e.state2.defined()) r.state2 = e.state2.clone();
    ref.push_back(r);
  }
  for (int step = 1; step <= 3; ++step) {
    OptimizerUpdateArgs args = cfg.args;
    for (size_t k = 0; k < fused.size(); ++k) {
      const Tensor g = random_tensor({kSizes[k]}, gen, dtype);
      for (OptimizerTensor* e : {&fused[k], &ref[k]}) {
        e->grad = g;
        e->first = step == 1;
        e->step_size = cfg.args.lr / (1.0 - std::pow(cfg.args.beta1, double(step)));
        e->inv_bias2_sqrt = 1.0 / std::sqrt(1.0 - std::pow(cfg.args.beta2, double(step)));
      }
      reference_update(cfg.args, ref[k]);
    }
    args.tensors = fused;
    ops::optimizer_update(args);
    for (size_t k = 0; k < fused.size(); ++k) {
      const std::string what = cfg.name + " " + dtype_name(dtype) + " step " + std::to_string(step) + " tensor " +
                               std::to_string(k) + " (" + std::to_string(kSizes[k]) + " elements)";
      if (tol == 0) {
        EXPECT_EQ(fused[k].param.to_vector(), ref[k].param.to_vector()) << what;
        if (ref[k].state1.defined()) {
          EXPECT_EQ(fused[k].state1.to_vector(), ref[k].state1.to_vector()) << what;
        }
        if (ref[k].state2.defined()) {
          EXPECT_EQ(fused[k].state2.to_vector(), ref[k].state2.to_vector()) << what;
        }
      } else {
        EXPECT_LE(rel_error(fused[k].param, ref[k].param), tol) << what;
        if (ref[k].state1.defined()) {
          EXPECT_LE(rel_error(fused[k].state1, ref[k].state1), tol) << what;
        }
        if (ref[k].state2.defined()) {
          EXPECT_LE(rel_error(fused[k].state2, ref[k].state2), tol) << what;
        }
      }
    }
  }
}

TEST(FusedUpdate, ReproducesTheOpChainsExactlyInF64) {
  for (const Config& c : configs()) run_config(c, DType::F64, 0.0);
}

TEST(FusedUpdate, ReproducesTheOpChainsInF32) {
  for (const Config& c : configs()) run_config(c, DType::F32, 1e-6);
}

TEST(FusedUpdate, RejectsMismatchedEntries) {
  OptimizerUpdateArgs a;
  a.kind = OptimizerKind::Adam;
  OptimizerTensor e;
  e.param = Tensor::zeros({3}, DType::F64);
  e.grad = Tensor::zeros({3}, DType::F64);
  a.tensors = {e};
  try {
    ops::optimizer_update(a);
    FAIL() << "no error for a missing exp_avg";
  } catch (const Error& err) {
    EXPECT_THAT(err.what(), ::testing::HasSubstr("entry 0 has no exp_avg"));
  }
  e.state1 = Tensor::zeros({4}, DType::F64);
  e.state2 = Tensor::zeros({3}, DType::F64);
  a.tensors = {e};
  EXPECT_THROW(ops::optimizer_update(a), Error);
  e.state1 = Tensor::zeros({3}, DType::F64);
  e.param = Tensor::zeros({3}, DType::BF16);
  e.grad = e.state1 = e.state2 = Tensor::zeros({3}, DType::BF16);
  a.tensors = {e};
  EXPECT_THROW(ops::optimizer_update(a), Error);  // f32 master weights (or f64) only
}

// ---- what optim/ keeps on top of the fused slot ------------------------------------------

TEST(FusedUpdate, NonContiguousParameterIsUpdatedInPlace) {
  Generator gen(5);
  const Tensor base = random_tensor({4, 3}, gen);
  Variable p(base.transpose(0, 1), true);  // [3, 4] view, not contiguous
  const Tensor g = random_tensor({3, 4}, gen);
  const std::vector<double> before = p.tensor().to_vector(), gv = g.to_vector();
  optim::SGD opt({{"w", p}}, optim::SGDOptions{0.5});
  p.set_grad(g);
  opt.step();
  EXPECT_EQ(p.tensor().storage().get(), base.storage().get());
  const std::vector<double> after = p.tensor().to_vector();
  for (size_t i = 0; i < after.size(); ++i) EXPECT_EQ(after[i], before[i] - gv[i] * 0.5) << i;
}

TEST(FusedUpdate, StateDictIsASnapshot) {
  Variable p(Tensor::from_values({1, 2, 3}, {3}, DType::F64), true);
  optim::Adam opt({{"w", p}});
  p.set_grad(Tensor::from_values({1, -1, 2}, {3}, DType::F64));
  opt.step();
  const auto snap = opt.state_dict();
  const std::vector<double> m1 = snap.at("w.exp_avg").to_vector();
  opt.step();
  EXPECT_EQ(snap.at("w.exp_avg").to_vector(), m1);
  EXPECT_NE(opt.state_dict().at("w.exp_avg").to_vector(), m1);
}

TEST(FusedUpdate, OptimizersMatchTheReferenceOverManyParameters) {
  Generator gen(11);
  std::vector<std::pair<std::string, Variable>> params;
  std::vector<OptimizerTensor> ref;
  for (size_t k = 0; k < kSizes.size(); ++k) {
    const Tensor t = random_tensor({kSizes[k]}, gen);
    params.push_back({"p" + std::to_string(k), Variable(t.clone(), true)});
    OptimizerTensor e;
    e.param = t;
    e.state1 = Tensor::zeros({kSizes[k]}, DType::F64);
    e.state2 = Tensor::zeros({kSizes[k]}, DType::F64);
    ref.push_back(e);
  }
  optim::AdamW opt(params, optim::AdamWOptions{0.02, 0.9, 0.95, 1e-7, 0.05});
  OptimizerUpdateArgs args;
  args.kind = OptimizerKind::AdamW, args.lr = 0.02, args.beta1 = 0.9, args.beta2 = 0.95, args.eps = 1e-7;
  args.weight_decay = 0.05;
  for (int step = 1; step <= 2; ++step) {
    for (size_t k = 0; k < params.size(); ++k) {
      const Tensor g = random_tensor({kSizes[k]}, gen);
      params[k].second.set_grad(g);
      ref[k].grad = g;
      ref[k].step_size = 0.02 / (1.0 - std::pow(0.9, double(step)));
      ref[k].inv_bias2_sqrt = 1.0 / std::sqrt(1.0 - std::pow(0.95, double(step)));
      reference_update(args, ref[k]);
    }
    opt.step();
    for (size_t k = 0; k < params.size(); ++k)
      EXPECT_EQ(params[k].second.tensor().to_vector(), ref[k].param.to_vector()) << "parameter " << k;
  }
}

}  // namespace
}  // namespace loom::test
