// The CUDA kernels of the fused slots (layer norm, group norm, GEGLU, the
// multi-tensor optimizer update) against the CPU in f64, for every storage dtype,
// at sizes that are no multiple of a tile and that take both the warp-per-row and
// the block-per-row paths (ctest -L gpu). The CPU reference runs in f64 on the
// very values the GPU sees (inputs rounded to the tested dtype first). Skips,
// with the reason, without a GPU.
#include <gtest/gtest.h>

#include <string>
#include <tuple>
#include <vector>

#include "tensor/backend.h"
#include "tensor/ops_fused.h"
#include "tests/common/fused_reference.h"
#include "tests/test_helpers.h"

namespace loom::test {
namespace {

const Device kCuda = Device::cuda(0);
const std::vector<DType> kDtypes = {DType::F32, DType::F64, DType::BF16, DType::F16};

double tol_for(DType dtype) {
  switch (dtype) {
    case DType::F64: return 1e-12;
    case DType::F32: return 1e-5;
    default: return 1e-2;
  }
}

// A random tensor in `dtype` on the GPU, and the same values in f64 on the CPU.
struct Pair {
  Tensor gpu, cpu;
};
Pair random_pair(const Shape& shape, Generator& gen, DType dtype, double mean = 0.0, double std = 1.0) {
  const Tensor t = random_tensor(shape, gen, dtype, Device::cpu(), mean, std);
  return {t.to(kCuda), t.to(DType::F64)};
}

void expect_close(const Tensor& gpu, const Tensor& cpu_f64, DType dtype, const std::string& what) {
  ASSERT_TRUE(gpu.defined()) << what;
  EXPECT_EQ(gpu.device(), kCuda) << what;
  EXPECT_LE(rel_error(gpu.to(Device::cpu()), cpu_f64), tol_for(dtype)) << what;
}

Generator fresh_generator(const std::string& name) {
  return Generator(std::hash<std::string>{}(name) ^ ::testing::UnitTest::GetInstance()->random_seed());
}

// Rows of every path: the row in registers (16-byte packs, n ≤ 2048 in bf16 / f16, ≤ 1024 in f32,
// ≤ 512 in f64; 2048 the bf16 limit, 2056 one pack past it), the pack loop, single elements; in
// bf16 / f16 the row-groups kernel (n = 320, 640, 1280: 8, 16, 32 lanes of 5 packs; 256, 512, 2048:
// 4 or 8 packs), with row counts that leave a block or a warp's row groups part full.
TEST(GpuFused, LayerNormMatchesCpuF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen = fresh_generator("gpu_layer_norm");
  for (DType dtype : kDtypes) {
    for (const auto& rn : std::vector<std::pair<int64_t, int64_t>>{{1, 40}, {333, 320}, {7, 1283}, {65, 2500}, {9, 1280}, {5, 2048}, {3, 2056}, {1001, 640}, {37, 512},
              {2, 256}, {10007, 320}}) {
      const int64_t rows = rn.first, n = rn.second;
      const std::string what = std::string(dtype_name(dtype)) + " [" + std::to_string(rows) + ", " +
                               std::to_string(n) + "]";
      const Pair x = random_pair({rows, n}, gen, dtype, 0.5, 2.0), w = random_pair({n}, gen, dtype),
                 b = random_pair({n}, gen, dtype), dy = random_pair({rows, n}, gen, dtype);
      const ops::NormForward fg = ops::layer_norm(x.gpu, n, w.gpu, b.gpu, 1e-5);
      const ops::NormForward fc = ops::layer_norm(x.cpu, n, w.cpu, b.cpu, 1e-5);
      expect_close(fg.y, fc.y, dtype, what + " y");
      expect_close(fg.mean, fc.mean, dtype, what + " mean");
      expect_close(fg.rstd, fc.rstd, dtype, what + " rstd");
      const ops::NormGrads gg = ops::layer_norm_backward(dy.gpu, x.gpu, n, w.gpu, fg.mean, fg.rstd);
      const ops::NormGrads gc = ops::layer_norm_backward(dy.cpu, x.cpu, n, w.cpu, fc.mean, fc.rstd);
      expect_close(gg.dx, gc.dx, dtype, what + " dx");
      expect_close(gg.dweight, gc.dweight, dtype, what + " dweight");
      expect_close(gg.dbias, gc.dbias, dtype, what + " dbias");
      const ops::NormForward plain = ops::layer_norm(x.gpu, n, Tensor(), Tensor(), 1e-6);
      expect_close(plain.y, ops::layer_norm(x.cpu, n, Tensor(), Tensor(), 1e-6).y, dtype, what + " y (no affine)");
    }
  }
}

// Layer norm after a residual add (a transformer block's h = a + h, then the norm): the row-in-
// registers pass (n a multiple of the pack, ≤ 2048 in 16-bit types) and the add-then-norm path
// (n = 1283, 2056; a residual off the 16-byte grid): the sum equals the GPU's own add bit for bit
// and the norm equals the GPU's norm of that sum bit for bit (in 2-byte types within rounding: the
// plain norm there may take the row-groups kernel); both against the CPU in f64.
TEST(GpuFused, LayerNormAfterAnAddMatchesTheTwoOps) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen = fresh_generator("gpu_add_layer_norm");
  for (DType dtype : kDtypes) {
    for (const auto& rn : std::vector<std::pair<int64_t, int64_t>>{{333, 320}, {9, 1280}, {5, 2048}, {7, 1283}, {3, 2056}}) {
      const int64_t rows = rn.first, n = rn.second;
      for (bool offset : {false, true}) {
        const std::string what = std::string(dtype_name(dtype)) + " [" + std::to_string(rows) + ", " +
                                 std::to_string(n) + "]" + (offset ? " residual at element 1" : "");
        const Pair x = random_pair({rows, n}, gen, dtype, 0.5, 2.0), w = random_pair({n}, gen, dtype),
                   b = random_pair({n}, gen, dtype), base = random_pair({rows * n + 1}, gen, dtype);
        const int64_t at = offset ? 1 : 0;
        const Tensor rg = base.gpu.narrow(0, at, rows * n).reshape({rows, n});
        const Tensor rc = base.cpu.narrow(0, at, rows * n).reshape({rows, n});
        const ops::NormForward f = ops::layer_norm(x.gpu, n, w.gpu, b.gpu, 1e-5, rg);
        const Tensor sum = ops::add(x.gpu, rg);
        EXPECT_EQ(f.sum.to(Device::cpu()).to_vector(), sum.to(Device::cpu()).to_vector()) << what << " sum";
        const Tensor norm_of_sum = ops::layer_norm(sum, n, w.gpu, b.gpu, 1e-5).y;
        if (itemsize(dtype) == 2) {  // the plain norm may take the row-groups kernel: other float sums
          EXPECT_LE(rel_error(f.y.to(Device::cpu()), norm_of_sum.to(Device::cpu())), 4e-3) << what << " norm";
        } else {
          EXPECT_EQ(f.y.to(Device::cpu()).to_vector(), norm_of_sum.to(Device::cpu()).to_vector()) << what << " norm";
        }
        const Tensor sum_cpu = ops::add(x.cpu, rc);
        expect_close(f.sum, sum_cpu, dtype, what + " sum against the CPU");
        expect_close(f.y, ops::layer_norm(sum_cpu, n, w.cpu, b.cpu, 1e-5).y, dtype, what + " norm against the CPU");
      }
    }
  }
}

TEST(GpuFused, GroupNormMatchesCpuF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen = fresh_generator("gpu_group_norm");
  struct Case {
    Shape shape;
    int64_t groups;
  };
  // 16-byte packs where the spatial extent is a multiple of the pack ({1, 8, 2000}, {2, 64, 8, 8},
  // {1, 64, 64, 72}), single elements otherwise; groups of several statistics chunks (16384
  // values each) with a partial last one: {2, 6, 130, 131} (51090 values a group, single
  // elements) and {1, 64, 64, 72} (73728, packs)
  const std::vector<Case> cases = {{{2, 320, 9, 13}, 32}, {{3, 12, 333}, 4},      {{1, 8, 2000}, 2},
                                   {{2, 9}, 3},           {{2, 64, 8, 8}, 32},    {{2, 6, 130, 131}, 2},
                                   {{1, 64, 64, 72}, 4}};
  // (No groups of two elements: their normalised outputs are ±1 whatever the input, so dx is
  // rounding noise around an exact 0 and has no relative accuracy to compare.)
  for (DType dtype : kDtypes) {
    for (const Case& c : cases) {
      const std::string what = std::string(dtype_name(dtype)) + " " + Tensor::empty(c.shape).str();
      const int64_t ch = c.shape[1];
      const Pair x = random_pair(c.shape, gen, dtype, -0.3, 1.5), w = random_pair({ch}, gen, dtype),
                 b = random_pair({ch}, gen, dtype), dy = random_pair(c.shape, gen, dtype);
      const ops::NormForward fg = ops::group_norm(x.gpu, c.groups, w.gpu, b.gpu, 1e-6);
      const ops::NormForward fc = ops::group_norm(x.cpu, c.groups, w.cpu, b.cpu, 1e-6);
      expect_close(fg.y, fc.y, dtype, what + " y");
      expect_close(fg.mean, fc.mean, dtype, what + " mean");
      expect_close(fg.rstd, fc.rstd, dtype, what + " rstd");
      const ops::NormGrads gg = ops::group_norm_backward(dy.gpu, x.gpu, c.groups, w.gpu, fg.mean, fg.rstd);
      const ops::NormGrads gc = ops::group_norm_backward(dy.cpu, x.cpu, c.groups, w.cpu, fc.mean, fc.rstd);
      expect_close(gg.dx, gc.dx, dtype, what + " dx");
      expect_close(gg.dweight, gc.dweight, dtype, what + " dweight");
      expect_close(gg.dbias, gc.dbias, dtype, what + " dbias");
      // with SiLU fused (inference), against silu of the CPU's f64 norm
      const Tensor sg = ops::group_norm(x.gpu, c.groups, w.gpu, b.gpu, 1e-6, true).y;
      expect_close(sg, ops::silu(fc.y), dtype, what + " silu(y)");
      EXPECT_LE(rel_error(ops::group_norm(x.cpu, c.groups, w.cpu, b.cpu, 1e-6, true).y, ops::silu(fc.y)), 1e-13)
          << what << " silu(y) on the CPU";
    }
  }
  // x off the 16-byte grid (a view at element 1): the single-element path, same values
  for (DType dtype : kDtypes) {
    const Pair base = random_pair({1 + 2 * 16 * 64}, gen, dtype);
    const Tensor xg = base.gpu.narrow(0, 1, 2 * 16 * 64).reshape({2, 16, 64});
    const Tensor xc = base.cpu.narrow(0, 1, 2 * 16 * 64).reshape({2, 16, 64});
    expect_close(ops::group_norm(xg, 4, Tensor(), Tensor(), 1e-6, true).y,
                 ops::silu(ops::group_norm(xc, 4, Tensor(), Tensor(), 1e-6).y), dtype,
                 std::string(dtype_name(dtype)) + " unaligned x, silu");
  }
}

// Group norm of x + shift[n, c] (a ResnetBlock2D's conv bias and time embedding inside norm2's
// pass), with and without SiLU, on both kernel paths (16-byte packs, single elements) and with
// several statistics chunks, against the CPU's f64 norm of the explicit sum; a shift of a wrong
// shape is refused.
TEST(GpuFused, GroupNormWithShiftMatchesCpuF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen = fresh_generator("gpu_group_norm_shift");
  struct Case {
    Shape shape;
    int64_t groups;
  };
  const std::vector<Case> cases = {{{2, 320, 9, 13}, 32}, {{3, 12, 333}, 4}, {{2, 64, 8, 8}, 32},
                                   {{1, 64, 64, 72}, 4}, {{2, 6, 130, 131}, 2}};
  for (DType dtype : kDtypes) {
    for (const Case& c : cases) {
      const std::string what = std::string(dtype_name(dtype)) + " " + Tensor::empty(c.shape).str();
      const int64_t n = c.shape[0], ch = c.shape[1];
      const Pair x = random_pair(c.shape, gen, dtype, -0.3, 1.5), w = random_pair({ch}, gen, dtype),
                 b = random_pair({ch}, gen, dtype), sh = random_pair({n, ch}, gen, dtype, 0.5, 2.0);
      Shape bcast(c.shape.size(), 1);
      bcast[0] = n, bcast[1] = ch;
      const ops::NormForward ref = ops::group_norm(ops::add(x.cpu, sh.cpu.reshape(bcast)), c.groups, w.cpu, b.cpu, 1e-6);
      const ops::NormForward fg = ops::group_norm(x.gpu, c.groups, w.gpu, b.gpu, 1e-6, false, sh.gpu);
      expect_close(fg.y, ref.y, dtype, what + " y");
      expect_close(fg.mean, ref.mean, dtype, what + " mean");
      expect_close(fg.rstd, ref.rstd, dtype, what + " rstd");
      const Tensor sg = ops::group_norm(x.gpu, c.groups, w.gpu, b.gpu, 1e-6, true, sh.gpu).y;
      expect_close(sg, ops::silu(ref.y), dtype, what + " silu(y)");
      EXPECT_LE(rel_error(ops::group_norm(x.cpu, c.groups, w.cpu, b.cpu, 1e-6, true, sh.cpu).y, ops::silu(ref.y)),
                1e-13)
          << what << " silu(y) on the CPU";
      EXPECT_THROW(ops::group_norm(x.gpu, c.groups, w.gpu, b.gpu, 1e-6, true, sh.gpu.reshape({n * ch})), Error)
          << what;
    }
  }
}

// Group norm's launcher: empty groups (spatial extent 0) give the CPU's statistics (mean 0, rstd
// 1/√eps) and no output values; more (sample, group) items than one launch's 65535 grid rows run
// in slices of whole samples.
TEST(GpuFused, GroupNormEmptyGroupsAndManyItemsMatchCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen = fresh_generator("gpu_group_norm_edges");
  for (DType dtype : {DType::F32, DType::BF16}) {
    const std::string what = dtype_name(dtype);
    const Pair empty = random_pair({2, 4, 0}, gen, dtype);
    const ops::NormForward eg = ops::group_norm(empty.gpu, 2, Tensor(), Tensor(), 1e-5);
    const ops::NormForward ec = ops::group_norm(empty.cpu, 2, Tensor(), Tensor(), 1e-5);
    EXPECT_EQ(eg.y.numel(), 0) << what;
    expect_close(eg.mean, ec.mean, dtype, what + " empty groups: mean");
    expect_close(eg.rstd, ec.rstd, dtype, what + " empty groups: rstd");
    const Pair many = random_pair({2100, 32, 1, 3}, gen, dtype, 0.2, 1.5), w = random_pair({32}, gen, dtype);
    const ops::NormForward mg = ops::group_norm(many.gpu, 32, w.gpu, Tensor(), 1e-5, true);
    const ops::NormForward mc = ops::group_norm(many.cpu, 32, w.cpu, Tensor(), 1e-5);
    expect_close(mg.y, ops::silu(mc.y), dtype, what + " 67200 items: silu(y)");
    expect_close(mg.rstd, mc.rstd, dtype, what + " 67200 items: rstd");
    const ops::NormForward pg = ops::group_norm(many.gpu, 32, w.gpu, Tensor(), 1e-5);
    const Pair dy = random_pair(many.cpu.shape(), gen, dtype);
    const ops::NormGrads gg = ops::group_norm_backward(dy.gpu, many.gpu, 32, w.gpu, pg.mean, pg.rstd);
    const ops::NormGrads gc = ops::group_norm_backward(dy.cpu, many.cpu, 32, w.cpu, mc.mean, mc.rstd);
    expect_close(gg.dx, gc.dx, dtype, what + " 67200 items: dx");
  }
}

TEST(GpuFused, GegluMatchesCpuF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen = fresh_generator("gpu_geglu");
  for (DType dtype : kDtypes) {
    for (bool approx : {false, true}) {
      for (const auto& rh : std::vector<std::pair<int64_t, int64_t>>{{1, 40}, {333, 320}, {7, 1283}}) {
        const std::string what = std::string(dtype_name(dtype)) + (approx ? " tanh" : " erf") + " [" +
                                 std::to_string(rh.first) + ", 2·" + std::to_string(rh.second) + "]";
        const Pair x = random_pair({rh.first, 2 * rh.second}, gen, dtype, 0.0, 2.0);
        const Pair dy = random_pair({rh.first, rh.second}, gen, dtype);
        expect_close(ops::geglu(x.gpu, approx), ops::geglu(x.cpu, approx), dtype, what + " y");
        expect_close(ops::geglu_backward(dy.gpu, x.gpu, approx), ops::geglu_backward(dy.cpu, x.cpu, approx), dtype,
                     what + " dx");
      }
    }
    // 16-byte packs where h is a multiple of the pack and x is aligned (h = 40, 320 above); x off the
    // 16-byte grid (a view at element 1) takes the single-element path
    const Pair base = random_pair({1 + 5 * 2 * 64}, gen, dtype, 0.0, 2.0);
    const Tensor xg = base.gpu.narrow(0, 1, 5 * 2 * 64).reshape({5, 2 * 64});
    const Tensor xc = base.cpu.narrow(0, 1, 5 * 2 * 64).reshape({5, 2 * 64});
    const Pair dy = random_pair({5, 64}, gen, dtype);
    const std::string what = std::string(dtype_name(dtype)) + " unaligned x";
    expect_close(ops::geglu(xg, false), ops::geglu(xc, false), dtype, what + " y");
    expect_close(ops::geglu_backward(dy.gpu, xg, false), ops::geglu_backward(dy.cpu, xc, false), dtype, what + " dx");
  }
}

TEST(GpuFused, BiasResidualAndAddLinearMatchCpuF64) {
  LOOM_SKIP_WITHOUT_CUDA();
  Generator gen = fresh_generator("gpu_bias_residual");
  for (DType dtype : kDtypes) {
    const std::string what = dtype_name(dtype);
    const Pair y = random_pair({333, 1283}, gen, dtype), b = random_pair({1283}, gen, dtype),
               r = random_pair({333, 1283}, gen, dtype);
    expect_close(ops::bias_residual(y.gpu, b.gpu, r.gpu), ops::bias_residual(y.cpu, b.cpu, r.cpu), dtype,
                 what + " bias_residual");
    expect_close(ops::bias_residual(y.gpu, Tensor(), r.gpu), ops::bias_residual(y.cpu, Tensor(), r.cpu), dtype,
                 what + " residual only");
    // a convolution's bias along dim 1 of NCHW: the 16-byte per-channel path (H·W a multiple of the
    // pack) and the element path (H·W = 35), against the explicit broadcast add on the CPU
    for (const Shape& s : {Shape{3, 37, 8, 16}, Shape{2, 19, 5, 7}}) {
      const Pair yc = random_pair(s, gen, dtype), bc = random_pair({s[1]}, gen, dtype), rc = random_pair(s, gen, dtype);
      const Tensor ref = ops::add(ops::add(yc.cpu, bc.cpu.reshape({s[1], 1, 1})), rc.cpu);
      expect_close(ops::bias_residual(yc.gpu, bc.gpu, rc.gpu, 1), ref, dtype, what + " bias_residual dim 1 " +
                   Tensor::empty(s).str());
      expect_close(ops::bias_residual(yc.gpu, Tensor(), rc.gpu, 1), ops::add(yc.cpu, rc.cpu), dtype,
                   what + " residual only, dim 1");
    }
    const Pair base = random_pair({2, 77, 320}, gen, dtype), h = random_pair({2, 77, 4}, gen, dtype),
               up = random_pair({320, 4}, gen, dtype);
    expect_close(ops::add_linear(base.gpu, h.gpu, up.gpu, 0.75), ops::add_linear(base.cpu, h.cpu, up.cpu, 0.75),
                 dtype, what + " add_linear");
  }
}

// Sizes of odd tensors, then enough small ones to need more than one launch's table.
std::vector<int64_t> update_sizes() {
  std::vector<int64_t> s = {1, 7, 333, 1283, 40 * 33, 5000, 4096, 4097};
  for (int k = 0; k < 300; ++k) s.push_back(1 + (k * 37) % 61);
  return s;
}

void check_update(OptimizerUpdateArgs cfg, DType dtype, const std::string& name) {
  Generator gen = fresh_generator("gpu_update_" + name);
  const std::vector<int64_t> sizes = update_sizes();
  std::vector<OptimizerTensor> gpu, cpu;
  const bool sgd = cfg.kind == OptimizerKind::Sgd;
  for (int64_t n : sizes) {
    OptimizerTensor c;
    c.param = random_tensor({n}, gen, dtype);
    if (!sgd || cfg.momentum != 0) c.state1 = sgd ? Tensor::empty({n}, dtype) : Tensor::zeros({n}, dtype);
    if (!sgd) c.state2 = Tensor::zeros({n}, dtype);
    OptimizerTensor g = c;
    g.param = c.param.to(kCuda);
    if (c.state1.defined()) g.state1 = c.state1.to(kCuda);
    if (c.state2.defined()) g.state2 = c.state2.to(kCuda);
    cpu.push_back(c);
    gpu.push_back(g);
  }
  for (int step = 1; step <= 3; ++step) {
    for (size_t k = 0; k < sizes.size(); ++k) {
      cpu[k].grad = random_tensor({sizes[k]}, gen, dtype);
      gpu[k].grad = cpu[k].grad.to(kCuda);
      for (OptimizerTensor* e : {&cpu[k], &gpu[k]}) {
        e->first = step == 1;
        e->step_size = cfg.lr / (1.0 - std::pow(cfg.beta1, double(step)));
        e->inv_bias2_sqrt = 1.0 / std::sqrt(1.0 - std::pow(cfg.beta2, double(step)));
      }
    }
    cfg.tensors = cpu;
    ops::optimizer_update(cfg);
    cfg.tensors = gpu;
    ops::optimizer_update(cfg);
    // Same op-by-op arithmetic without FMA contraction on both devices: equal up to
    // the last bit in practice; the bound allows one rounding step.
    const double tol = dtype == DType::F64 ? 1e-15 : 1e-7;
    for (size_t k = 0; k < sizes.size(); ++k) {
      const std::string what = name + " " + dtype_name(dtype) + " step " + std::to_string(step) + " tensor " +
                               std::to_string(k) + " (" + std::to_string(sizes[k]) + " elements)";
      EXPECT_LE(rel_error(gpu[k].param.to(Device::cpu()), cpu[k].param), tol) << what;
      if (cpu[k].state1.defined()) {
        EXPECT_LE(rel_error(gpu[k].state1.to(Device::cpu()), cpu[k].state1), tol) << what;
      }
      if (cpu[k].state2.defined()) {
        EXPECT_LE(rel_error(gpu[k].state2.to(Device::cpu()), cpu[k].state2), tol) << what;
      }
    }
  }
}

TEST(GpuFused, OptimizerUpdateOverOddSizedTensorsMatchesCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  for (DType dtype : {DType::F64, DType::F32}) {
    OptimizerUpdateArgs sgd;
    sgd.kind = OptimizerKind::Sgd, sgd.lr = 0.05, sgd.momentum = 0.9, sgd.dampening = 0.1, sgd.weight_decay = 0.01;
    check_update(sgd, dtype, "sgd_momentum");
    sgd.dampening = 0.0, sgd.nesterov = true;
    check_update(sgd, dtype, "sgd_nesterov");
    OptimizerUpdateArgs adam;
    adam.kind = OptimizerKind::Adam, adam.lr = 0.01, adam.beta1 = 0.8, adam.beta2 = 0.99, adam.eps = 1e-6;
    adam.weight_decay = 0.1;
    check_update(adam, dtype, "adam_l2");
    adam.kind = OptimizerKind::AdamW;
    check_update(adam, dtype, "adamw");
  }
}

TEST(GpuFused, SupportsNamesTheFusedKinds) {
  LOOM_SKIP_WITHOUT_CUDA();
  Backend& be = backend_for(kCuda);
  for (DType dtype : kDtypes) {
    EXPECT_TRUE(be.supports(OpKind::LayerNorm, dtype)) << dtype_name(dtype);
    EXPECT_TRUE(be.supports(OpKind::GroupNorm, dtype)) << dtype_name(dtype);
    EXPECT_TRUE(be.supports(OpKind::Geglu, dtype)) << dtype_name(dtype);
  }
  EXPECT_TRUE(be.supports(OpKind::OptimizerUpdate, DType::F32));
  EXPECT_FALSE(be.supports(OpKind::OptimizerUpdate, DType::BF16));
}

}  // namespace
}  // namespace loom::test
