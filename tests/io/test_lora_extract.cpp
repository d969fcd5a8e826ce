// loom extract / resize (io/lora_extract.h): the SVDs against numpy's (fixtures/svd_golden.safetensors,
// made by make_svd_golden.py), the truncation optimality ‖ΔW − ΔW_r‖² = Σ dropped σ², exact
// recovery of a rank-r ΔW, LoCon shapes, errors naming the module (ctest -L io).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "adapters/lora.h"
#include "attention/transformer.h"
#include "io/lora_extract.h"
#include "nn/conv.h"
#include "tensor/ops.h"
#include "tests/test_helpers.h"
#include "unet/unet_io.h"

namespace loom::io {
namespace {

using ::testing::HasSubstr;
using loom::testing::error_of;
using loom::testing::rel_error;
using loom::testing::TempDir;

// ---- helpers ------------------------------------------------------------------------------------

Tensor f64(const Tensor& t) { return t.to(DType::F64).contiguous(); }

Tensor product(const Tensor& left, const Tensor& right) { return ops::matmul(f64(left), f64(right)); }

double frobenius_sq(const Tensor& t) {
  double s = 0;
  for (double v : t.to_vector()) s += v * v;
  return s;
}

// s·up·down of a LoRA module as an (out, in·kh·kw) matrix.
Tensor module_delta(const RawLoraModule& m) {
  const int64_t out = m.up.size(0), r = m.rank();
  return ops::mul_scalar(product(m.up.reshape({out, r}), m.down.reshape({r, m.down.numel() / r})), m.scale());
}

attention::Transformer2DConfig small_config(int64_t layers = 1, int64_t head_dim = 4) {
  attention::Transformer2DConfig c;
  c.in_channels = 8, c.num_attention_heads = 2, c.attention_head_dim = head_dim, c.num_layers = layers;
  c.cross_attention_dim = 6, c.norm_num_groups = 2;
  return c;
}

std::shared_ptr<attention::Transformer2DModel> small_model(int64_t layers = 1, int64_t head_dim = 4) {
  Generator gen(3);
  return std::make_shared<attention::Transformer2DModel>(small_config(layers, head_dim), gen, DType::F64);
}

// Adds `delta` (the weight's shape, or its matrix form) to the parameter `path` + ".weight".
void add_to_weight(nn::Module& model, const std::string& path, const Tensor& delta) {
  const Variable w = model.find_parameter(path + ".weight");
  ASSERT_TRUE(w.defined()) << path;
  w.tensor().copy_(ops::add(w.tensor(), delta.reshape(w.shape()).to(w.tensor().dtype())));
}

// A rank-r matrix (out, in) with σ well apart.
Tensor low_rank_matrix(int64_t out, int64_t in, int64_t r, uint64_t seed) {
  Generator gen(seed);
  return ops::matmul(Tensor::randn({out, r}, gen, DType::F64), Tensor::randn({r, in}, gen, DType::F64));
}

const ModuleReport& row_of(const LowRankReport& r, const std::string& path) {
  for (const ModuleReport& m : r.modules)
    if (m.path == path) return m;
  throw std::runtime_error("no report row for " + path);
}

// ---- the SVDs against numpy ---------------------------------------------------------------------

TensorFile golden() { return read_safetensors(std::string(LOOM_IO_FIXTURES) + "/svd_golden.safetensors"); }

TEST(LowRank, DenseSvdMatchesNumpyAndDropsExactlyTheTailEnergy) {
  const TensorFile g = golden();
  for (const std::string name : {"tall", "wide", "conv"}) {
    SCOPED_TRACE(name);
    const Tensor m = *g.find(name + ".matrix");
    const int64_t r = int64_t(g.find(name + ".rank")->item());
    const std::vector<double> sigma = g.find(name + ".sigma")->to_vector();
    const TruncatedSvd svd = truncated_svd(m, r);
    ASSERT_EQ(svd.sigma.size(), sigma.size());
    for (size_t i = 0; i < sigma.size(); ++i) EXPECT_NEAR(svd.sigma[i], sigma[i], 1e-12 * sigma[0]);
    const Tensor approx = product(svd.left, svd.right);
    EXPECT_LT(rel_error(approx, *g.find(name + ".trunc")), 1e-12);
    // Eckart–Young: what is dropped is exactly the tail of numpy's σ².
    double dropped = 0, all = 0;
    for (size_t i = 0; i < sigma.size(); ++i) all += sigma[i] * sigma[i], dropped += int64_t(i) >= r ? sigma[i] * sigma[i] : 0;
    EXPECT_NEAR(frobenius_sq(ops::sub(m, approx)), dropped, 1e-11 * all);
    EXPECT_NEAR(svd.energy_kept(), 1 - dropped / all, 1e-12);
  }
}

TEST(LowRank, ProductSvdThroughQrMatchesNumpyOnTheDenseProduct) {
  const TensorFile g = golden();
  const double s = g.find("prod.scale")->item();
  const TruncatedSvd svd = truncated_svd_of_product(ops::mul_scalar(*g.find("prod.up"), s), *g.find("prod.down"), 2);
  const std::vector<double> sigma = g.find("prod.sigma")->to_vector();  // 9 values, the last 5 zero
  ASSERT_EQ(svd.sigma.size(), 4u);  // the rank of up·down
  for (size_t i = 0; i < 4; ++i) EXPECT_NEAR(svd.sigma[i], sigma[i], 1e-12 * sigma[0]);
  for (size_t i = 4; i < sigma.size(); ++i) EXPECT_LT(sigma[i], 1e-12 * sigma[0]);
  EXPECT_LT(rel_error(product(svd.left, svd.right), *g.find("prod.trunc")), 1e-12);
}

TEST(LowRank, RankForEnergyIsTheSmallestRankKeepingTheShare) {
  const std::vector<double> sigma{3, 2, 1};  // σ² 9, 4, 1: shares 9/14, 13/14, 1
  EXPECT_EQ(rank_for_energy(sigma, 0.5), 1);
  EXPECT_EQ(rank_for_energy(sigma, 9.0 / 14), 1);
  EXPECT_EQ(rank_for_energy(sigma, 0.65), 2);
  EXPECT_EQ(rank_for_energy(sigma, 13.0 / 14), 2);
  EXPECT_EQ(rank_for_energy(sigma, 0.95), 3);
  EXPECT_EQ(rank_for_energy(sigma, 1.0), 3);
  EXPECT_EQ(rank_for_energy({0, 0}, 0.9), 1);
  EXPECT_DOUBLE_EQ(energy_share(sigma, 2), 13.0 / 14);
}

// ---- extract --------------------------------------------------------------------------------------

TEST(Extract, ARankRChangeIsRecoveredExactlyAndUnchangedModulesAreSkipped) {
  auto base = small_model(), tuned = small_model();
  const Tensor dq = low_rank_matrix(8, 8, 2, 1), dv = low_rank_matrix(8, 6, 1, 2), din = low_rank_matrix(8, 8, 2, 3);
  add_to_weight(*tuned, "transformer_blocks.0.attn1.to_q", dq);
  add_to_weight(*tuned, "transformer_blocks.0.attn2.to_v", dv);
  add_to_weight(*tuned, "proj_in", din);  // a Conv1x1: (out, in, 1, 1)
  tuned->find_parameter("proj_out.bias").tensor().fill_(0.25);
  ExtractOptions o;
  o.rank = 2;
  const ExtractResult r = extract_lora(*base, *tuned, o);
  ASSERT_EQ(r.lora.modules.size(), 3u);
  EXPECT_LT(rel_error(module_delta(r.lora.modules.at("transformer_blocks.0.attn1.to_q")), dq), 1e-12);
  EXPECT_LT(rel_error(module_delta(r.lora.modules.at("transformer_blocks.0.attn2.to_v")), dv), 1e-12);
  const RawLoraModule& pin = r.lora.modules.at("proj_in");
  EXPECT_EQ(pin.down.shape(), (Shape{2, 8, 1, 1}));
  EXPECT_EQ(pin.up.shape(), (Shape{8, 2, 1, 1}));
  EXPECT_LT(rel_error(module_delta(pin), din), 1e-12);
  EXPECT_EQ(*pin.alpha, 2.0);  // alpha = rank: scale 1, up = U·S
  for (const auto& [path, m] : r.lora.modules) EXPECT_NEAR(row_of(r.report, path).energy, 1.0, 1e-12) << path;
  const ModuleReport& k = row_of(r.report, "transformer_blocks.0.attn1.to_k");
  EXPECT_EQ(k.rank, 0);
  EXPECT_THAT(k.note, HasSubstr("unchanged"));
  EXPECT_NEAR(r.report.total_energy(), 1.0, 1e-12);
  ASSERT_EQ(r.report.notes.size(), 1u);
  EXPECT_THAT(r.report.notes[0], HasSubstr("'proj_out.bias'"));
  EXPECT_THAT(r.report.table(), HasSubstr("3 modules written"));
}

TEST(Extract, TruncationDropsExactlyTheTailEnergyWithAnyAlpha) {
  auto base = small_model(), tuned = small_model();
  Generator gen(9);
  const Tensor dk = Tensor::randn({8, 6}, gen, DType::F64), dff = Tensor::randn({64, 8}, gen, DType::F64);
  add_to_weight(*tuned, "transformer_blocks.0.attn2.to_k", dk);
  add_to_weight(*tuned, "transformer_blocks.0.ff.net.0.proj", dff);
  ExtractOptions o;
  o.rank = 3, o.alpha = 1.5, o.prefix = "down_blocks.1.attentions.0";
  const ExtractResult r = extract_lora(*base, *tuned, o);
  for (const auto& [path, dense] : {std::pair{std::string("transformer_blocks.0.attn2.to_k"), dk},
                                    std::pair{std::string("transformer_blocks.0.ff.net.0.proj"), dff}}) {
    SCOPED_TRACE(path);
    const RawLoraModule& m = r.lora.modules.at(o.prefix + "." + path);
    EXPECT_EQ(m.rank(), 3);
    EXPECT_DOUBLE_EQ(m.scale(), 0.5);
    const std::vector<double> sigma = truncated_svd(dense, 8).sigma;  // checked against numpy above
    double dropped = 0, all = 0;
    for (size_t i = 0; i < sigma.size(); ++i) all += sigma[i] * sigma[i], dropped += i >= 3 ? sigma[i] * sigma[i] : 0;
    EXPECT_NEAR(frobenius_sq(ops::sub(dense, module_delta(m))), dropped, 1e-10 * all);
    const ModuleReport& row = row_of(r.report, o.prefix + "." + path);
    EXPECT_NEAR(row.energy, 1 - dropped / all, 1e-12);
    EXPECT_NEAR(row.sigma_sq, all, 1e-10 * all);
  }
}

// A module holding one k×k Conv2d (as a UNet's resnets have).
struct ConvNet : nn::Module {
  explicit ConvNet(uint64_t seed) {
    Generator gen(seed);
    register_module("conv", std::make_shared<nn::Conv2d>(3, 5, 3, 1, 1, true, gen, DType::F64));
  }
};

TEST(Extract, KxKConvsBecomeLoConWithConvRankAndAreSkippedWithoutIt) {
  ConvNet base(1), tuned(1);
  const Tensor d = low_rank_matrix(5, 27, 2, 4);
  add_to_weight(tuned, "conv", d);
  ExtractOptions o;
  o.rank = 4;
  EXPECT_THAT(error_of([&] { extract_lora(base, tuned, o); }), HasSubstr("does not differ"));
  o.conv_rank = 2;
  const ExtractResult r = extract_lora(base, tuned, o);
  const RawLoraModule& m = r.lora.modules.at("conv");
  EXPECT_EQ(m.down.shape(), (Shape{2, 3, 3, 3}));  // a conv with the base's kernel
  EXPECT_EQ(m.up.shape(), (Shape{5, 2, 1, 1}));    // then a 1×1 conv
  EXPECT_LT(rel_error(module_delta(m), d), 1e-12);
  o.conv_rank = 99;  // capped at min(out, in·kh·kw)
  const ExtractResult capped = extract_lora(base, tuned, o);
  EXPECT_EQ(capped.lora.modules.at("conv").rank(), 5);
  EXPECT_THAT(row_of(capped.report, "conv").note, HasSubstr("capped"));
}

TEST(Extract, MinDiffAndClampingFollowTheirOptions) {
  auto base = small_model(), tuned = small_model();
  add_to_weight(*tuned, "transformer_blocks.0.attn1.to_q", ops::mul_scalar(low_rank_matrix(8, 8, 1, 5), 1e-4));
  add_to_weight(*tuned, "transformer_blocks.0.attn1.to_k", low_rank_matrix(8, 8, 1, 6));
  ExtractOptions o;
  o.rank = 2, o.min_diff = 1e-2;
  const ExtractResult r = extract_lora(*base, *tuned, o);
  EXPECT_EQ(r.lora.modules.size(), 1u);
  EXPECT_THAT(row_of(r.report, "transformer_blocks.0.attn1.to_q").note, HasSubstr("--min-diff"));
  o.clamp_quantile = 0.5;  // half the values clamped: no longer exact
  const ExtractResult c = extract_lora(*base, *tuned, o);
  EXPECT_THAT(row_of(c.report, "transformer_blocks.0.attn1.to_k").note, HasSubstr("clamped"));
  EXPECT_GT(rel_error(module_delta(c.lora.modules.at("transformer_blocks.0.attn1.to_k")),
                      low_rank_matrix(8, 8, 1, 6)), 1e-3);
}

TEST(Extract, ModulesInOneModelOnlyOrOfOtherShapesAreErrorsNamingThem) {
  auto one = small_model(1), two = small_model(2);
  const std::string e = error_of([&] { extract_lora(*one, *two, {}, "base_dir", "tuned_dir"); });
  EXPECT_THAT(e, HasSubstr("tuned_dir"));
  EXPECT_THAT(e, HasSubstr("'transformer_blocks.1.attn1.to_q'"));
  EXPECT_THAT(e, HasSubstr("not in the base model base_dir"));
  EXPECT_THAT(error_of([&] { extract_lora(*two, *one, {}, "b", "t"); }), HasSubstr("has no module 'transformer_blocks.1"));
  auto wide = small_model(1, 5);
  const std::string s = error_of([&] { extract_lora(*one, *wide, {}, "b", "t"); });
  EXPECT_THAT(s, HasSubstr("t: module 'proj_in' has the weight shape [10, 8, 1, 1], the base model b [8, 8, 1, 1]"));
  auto same = small_model();
  EXPECT_THAT(error_of([&] { extract_lora(*one, *same, {}, "b", "t"); }), HasSubstr("does not differ from the base model b"));
  auto nan = small_model();
  add_to_weight(*nan, "proj_out", Tensor::full({8, 8}, NAN, DType::F64));
  EXPECT_THAT(error_of([&] { extract_lora(*one, *nan, {}, "b", "t"); }), HasSubstr("'proj_out': the difference to the base holds NaN"));
}

// The tuned model is the sd1 fixture UNet with PEFT's LoCon (r 2, alpha 3, on conv1, conv2,
// conv_shortcut, the samplers' conv and to_q; tests/unet/fixtures/make_locon_fixture.py) fused in:
// extracting at rank 2 recovers an adapter that gives diffusers+PEFT's output.
TEST(Extract, APeftLoConFusedIntoTheUNetIsRecoveredAndGivesDiffusersOutput) {
  const std::string dir = std::string(LOOM_UNET_FIXTURE_DIR) + "/sd1";
  unet::UNetLoadOptions lo;
  lo.dtype = DType::F64;
  auto base = unet::load_unet_dir(dir, lo).model, tuned = unet::load_unet_dir(dir, lo).model;
  const TensorFile peft = read_safetensors(dir + "/locon_peft.safetensors");
  size_t adapted = 0;
  for (const auto& [key, a] : peft.tensors) {
    const size_t at = key.rfind(".lora_A.weight");
    if (at == std::string::npos) continue;
    const std::string path = key.substr(0, at);
    const Tensor b = *peft.find(path + ".lora_B.weight");
    add_to_weight(*tuned, path, ops::mul_scalar(product(b.reshape({b.size(0), 2}), a.reshape({2, a.numel() / 2})), 1.5));
    ++adapted;
  }
  ExtractOptions o;
  o.rank = 2, o.conv_rank = 2;
  const ExtractResult r = extract_lora(*base, *tuned, o);
  EXPECT_EQ(r.lora.modules.size(), adapted);
  EXPECT_NEAR(r.report.total_energy(), 1.0, 1e-12);
  std::map<std::string, adapters::LoraModule> modules;
  for (const auto& [path, m] : r.lora.modules) {
    const bool linear = std::dynamic_pointer_cast<nn::Linear>(base->find_module(path)) != nullptr;
    adapters::LoraModule lm;
    lm.rank = m.rank();
    lm.alpha = m.alpha;
    lm.down = Variable(linear ? m.down.reshape({m.rank(), m.down.numel() / m.rank()}) : m.down);
    lm.up = Variable(linear ? m.up.reshape({m.up.size(0), m.rank()}) : m.up);
    modules[path] = lm;
  }
  adapters::LoraSet set(base);
  set.add_from_weights("extracted", modules);
  const TensorFile golden = read_safetensors(dir + "/golden.safetensors");
  unet::UNetInputs in;
  in.sample = Variable(golden.find("sample")->to(DType::F64));
  in.timestep = *golden.find("timestep");
  in.encoder_hidden_states = Variable(golden.find("encoder_hidden_states")->to(DType::F64));
  NoGradGuard ng;
  EXPECT_LT(rel_error(base->forward(in).tensor(), peft.find("lora_output_f64")->to(DType::F64)), 1e-10);
}

// ---- resize ---------------------------------------------------------------------------------------

RawLora random_lora() {
  Generator gen(21);
  RawLora lora;
  lora.families.insert(KeyFamily::Kohya);
  lora.modules["a.to_q"] = {Tensor::randn({6, 10}, gen, DType::F64), Tensor::randn({9, 6}, gen, DType::F64), 3.0, false};
  lora.modules["b.conv1"] = {Tensor::randn({4, 3, 3, 3}, gen, DType::F64), Tensor::randn({5, 4, 1, 1}, gen, DType::F64),
                             std::nullopt, false};
  lora.modules["c.proj_in"] = {Tensor::randn({5, 7, 1, 1}, gen, DType::F64), Tensor::randn({7, 5, 1, 1}, gen, DType::F64),
                               8.0, true};  // rsLoRA: scale 8/√5
  return lora;
}

TEST(Resize, EachModuleIsTheBestRankRApproximationOfItsScaledDelta) {
  const RawLora in = random_lora();
  ResizeOptions o;
  o.rank = 2;
  const ResizeResult r = resize_lora(in, o);
  for (const auto& [path, m] : in.modules) {
    SCOPED_TRACE(path);
    const RawLoraModule& out = r.lora.modules.at(path);
    EXPECT_EQ(out.rank(), 2);
    EXPECT_EQ(out.down.dim(), m.down.dim());
    EXPECT_EQ(out.up.dim(), m.up.dim());
    EXPECT_EQ(out.alpha.has_value(), m.alpha.has_value());
    EXPECT_NEAR(out.scale(), m.scale(), 1e-12);  // the scale is kept: alpha' = s·r'
    const Tensor dense = module_delta(m);
    const TruncatedSvd svd = truncated_svd(dense, 2);
    EXPECT_LT(rel_error(module_delta(out), product(svd.left, svd.right)), 1e-10);
    double dropped = 0, all = 0;
    for (size_t i = 0; i < svd.sigma.size(); ++i)
      all += svd.sigma[i] * svd.sigma[i], dropped += i >= 2 ? svd.sigma[i] * svd.sigma[i] : 0;
    EXPECT_NEAR(frobenius_sq(ops::sub(dense, module_delta(out))), dropped, 1e-10 * all);
    EXPECT_NEAR(row_of(r.report, path).energy, 1 - dropped / all, 1e-10);
    EXPECT_EQ(row_of(r.report, path).old_rank, m.rank());
  }
}

TEST(Resize, AtOrAboveTheRankTheDeltaIsKeptAndEnergyPicksTheSmallestRank) {
  const RawLora in = random_lora();
  ResizeOptions o;
  o.rank = 64;
  const ResizeResult same = resize_lora(in, o);
  for (const auto& [path, m] : in.modules) {
    EXPECT_EQ(same.lora.modules.at(path).rank(), m.rank()) << path;
    EXPECT_LT(rel_error(module_delta(same.lora.modules.at(path)), module_delta(m)), 1e-12) << path;
  }
  ResizeOptions e;
  e.energy = 0.8;
  const ResizeResult r = resize_lora(in, e);
  for (const auto& [path, m] : in.modules) {
    const std::vector<double> sigma = truncated_svd(module_delta(m), 99).sigma;
    EXPECT_EQ(r.lora.modules.at(path).rank(), rank_for_energy(sigma, 0.8)) << path;
    EXPECT_GE(row_of(r.report, path).energy, 0.8);
  }
  e.rank = 1;  // both: the energy's rank, capped
  for (const auto& [path, m] : resize_lora(in, e).lora.modules) EXPECT_EQ(m.rank(), 1) << path;
}

TEST(Resize, FilesKeepTheirFamilyAndDtype) {
  TempDir dir;
  RawLora in = random_lora();
  in.modules.erase("b.conv1");
  for (auto& [p, m] : in.modules) m.up = m.up.to(DType::F32), m.down = m.down.to(DType::F32);
  std::map<std::string, std::string> meta;
  write_safetensors(dir.path() + "/in.safetensors", raw_lora_tensors(in, KeyFamily::Kohya, &meta), meta);
  ResizeOptions o;
  o.rank = 3;
  const LowRankReport report = resize_lora_file(dir.path() + "/in.safetensors", dir.path() + "/out.safetensors", o);
  EXPECT_EQ(report.written(), 2u);
  const TensorFile f = read_safetensors(dir.path() + "/out.safetensors");
  ASSERT_NE(f.find("lora_unet_a_to_q.lora_down.weight"), nullptr);
  EXPECT_EQ(f.find("lora_unet_a_to_q.lora_down.weight")->dtype(), DType::F32);
  EXPECT_EQ(f.find("lora_unet_a_to_q.lora_down.weight")->shape(), (Shape{3, 10}));
  const RawLora back = read_raw_lora(f, "out");
  const RawLora want = resize_lora(read_raw_lora(read_safetensors(dir.path() + "/in.safetensors"), "in"), o).lora;
  for (const auto& [path, m] : want.modules) EXPECT_LT(rel_error(module_delta(back.modules.at(path)), module_delta(m)), 1e-6) << path;
  // --format, and files that hold no LoRA
  resize_lora_file(dir.path() + "/in.safetensors", dir.path() + "/out.h5", o, KeyFamily::Loom);
  EXPECT_EQ(read_raw_lora(read_tensor_file(dir.path() + "/out.h5"), "out.h5").families, std::set<KeyFamily>{KeyFamily::Loom});
  write_safetensors(dir.path() + "/data.safetensors", {{"hidden_states", Tensor::zeros({1, 2})}});
  EXPECT_THAT(error_of([&] { resize_lora_file(dir.path() + "/data.safetensors", dir.path() + "/x.safetensors", o); }),
              HasSubstr("holds no LoRA module (1 tensors, first key 'hidden_states')"));
}

}  // namespace
}  // namespace loom::io
