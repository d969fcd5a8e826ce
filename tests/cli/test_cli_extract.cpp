// `loom extract` and `loom resize` end to end: the written files load with `loom run` and give
// the output of the model with the truncated ΔW fused in; flag and file errors (exit 2 / 3) name
// the flag, the file and the module. Also: an h5py-written model.h5 (no checksums) is said so
// once, and still checked for shapes and finiteness.
#include "tests/cli/cli_fixture.h"

#include <map>

#include "io/adapter_io.h"
#include "io/lora_extract.h"
#include "tensor/ops.h"

namespace loom {
namespace {

const std::string kQ = "transformer_blocks.0.attn1.to_q", kV = "transformer_blocks.0.attn2.to_v";

// A copy of the model directory `from` at `to`, with `deltas` (weight name -> ΔW, any shape of
// the weight's size) added to its weights.
void write_changed_model(const std::string& from, const std::string& to, const std::map<std::string, Tensor>& deltas) {
  fs::create_directories(to);
  fs::copy_file(from + "/config.json", to + "/config.json", fs::copy_options::overwrite_existing);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (auto [key, t] : io::read_safetensors(from + "/model.safetensors").tensors) {
    if (auto it = deltas.find(key); it != deltas.end())
      t = ops::add(t.to(DType::F64), it->second.to(DType::F64).reshape(t.shape())).to(DType::F32);
    tensors.emplace_back(key, t);
  }
  io::write_safetensors(to + "/model.safetensors", tensors);
}

Tensor low_rank(int64_t out, int64_t in, int64_t r, uint64_t seed, double scale = 0.3) {
  Generator gen(seed);
  return ops::mul_scalar(ops::matmul(Tensor::randn({out, r}, gen, DType::F64), Tensor::randn({r, in}, gen, DType::F64)), scale);
}

// The best rank-r approximation of ΔW (io::truncated_svd: checked against numpy in test_lora_extract).
Tensor truncated(const Tensor& delta, int64_t r) {
  const io::TruncatedSvd svd = io::truncated_svd(delta, r);
  return ops::matmul(svd.left, svd.right);
}

class CliExtract : public Cli {
 protected:
  void SetUp() override {
    Cli::SetUp();
    standard_fixtures();  // "model" (the base) and data.safetensors
  }
};

TEST_F(CliExtract, ARankRChangeIsExtractedExactlyInEveryFamilyAndRunsAsTheTunedModel) {
  write_changed_model(path("model"), path("tuned"), {{kQ + ".weight", low_rank(8, 8, 2, 1)}, {kV + ".weight", low_rank(8, 6, 1, 2)}});
  const Tensor want = run("tuned.safetensors", {}, "tuned");
  for (const std::string format : {"kohya", "peft", "diffusers", "loom"}) {
    SCOPED_TRACE(format);
    const std::string lora = path("lora_" + format + (format == "loom" ? ".h5" : ".safetensors"));
    const Result r = loom({"extract", "--base", path("model"), "--tuned", path("tuned"), "--rank", "2", "--out", lora,
                           "--format", format});
    ASSERT_EQ(r.code, 0) << r;
    EXPECT_THAT(r.out, HasSubstr("total: 2 modules written"));
    EXPECT_THAT(r.out, HasSubstr("energy kept 1.000000"));
    EXPECT_THAT(r.out, AllOf(HasSubstr(kQ), HasSubstr("unchanged")));
    EXPECT_LT(rel_error(run("out.safetensors", {"--adapter", lora}), want), 1e-5);
    EXPECT_LT(rel_error(run("fused.safetensors", {"--adapter", lora, "--fuse"}), want), 1e-5);
  }
  const io::RawLora kohya = io::read_raw_lora(io::read_tensor_file(path("lora_kohya.safetensors")), "lora");
  EXPECT_EQ(kohya.modules.at(kV).rank(), 2);
  EXPECT_DOUBLE_EQ(*kohya.modules.at(kV).alpha, 2.0);  // alpha = rank by default: scale 1
}

TEST_F(CliExtract, ATruncatedExtractRunsAsTheModelWithTheTruncatedDeltaFused) {
  Generator gen(5);
  const Tensor dq = ops::mul_scalar(Tensor::randn({8, 8}, gen, DType::F64), 0.2);
  write_changed_model(path("model"), path("tuned"), {{kQ + ".weight", dq}});
  write_changed_model(path("model"), path("fused_r3"), {{kQ + ".weight", truncated(dq, 3)}});
  const Result r = loom({"extract", "--base", path("model"), "--tuned", path("tuned"), "--rank", "3", "--alpha", "1",
                         "--out", path("lora.safetensors"), "--format", "peft", "--prefix", "down_blocks.1.attentions.0"});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("down_blocks.1.attentions.0." + kQ));
  const Tensor want = run("want.safetensors", {}, "fused_r3");
  EXPECT_LT(rel_error(run("out.safetensors", {"--adapter", path("lora.safetensors"), "--prefix", "down_blocks.1.attentions.0"}),
                      want), 1e-5);

  // resize the rank-3 file to 1: the model with its scaled ΔW truncated to rank 1
  const io::RawLora lora = io::read_raw_lora(io::read_tensor_file(path("lora.safetensors")), "lora");
  const io::RawLoraModule& m = lora.modules.at("down_blocks.1.attentions.0." + kQ);
  const Tensor delta3 = ops::mul_scalar(ops::matmul(m.up.to(DType::F64), m.down.to(DType::F64)), m.scale());
  write_changed_model(path("model"), path("fused_r1"), {{kQ + ".weight", truncated(delta3, 1)}});
  const Result s = loom({"resize", path("lora.safetensors"), path("r1.safetensors"), "--rank", "1"});
  ASSERT_EQ(s.code, 0) << s;
  EXPECT_THAT(s.out, AllOf(HasSubstr("3->1"), HasSubstr("total: 1 modules written")));
  const io::TensorFile r1 = io::read_tensor_file(path("r1.safetensors"));
  EXPECT_NE(r1.metadata.count("lora_adapter_metadata"), 0u);  // written as the input's family (PEFT)
  EXPECT_LT(rel_error(run("r1_out.safetensors", {"--adapter", path("r1.safetensors"), "--prefix", "down_blocks.1.attentions.0"}),
                      run("r1_want.safetensors", {}, "fused_r1")), 1e-5);
  // --energy 1 keeps every module whole
  const Result e = loom({"resize", path("lora.safetensors"), path("e.safetensors"), "--energy", "1", "--format", "kohya"});
  ASSERT_EQ(e.code, 0) << e;
  EXPECT_THAT(e.out, HasSubstr("3->3"));
  EXPECT_LT(rel_error(run("e_out.safetensors", {"--adapter", path("e.safetensors"), "--prefix", "down_blocks.1.attentions.0"}),
                      want), 1e-5);
}

TEST_F(CliExtract, FlagErrorsExitTwoNamingTheFlag) {
  write_changed_model(path("model"), path("tuned"), {{kQ + ".weight", low_rank(8, 8, 2, 1)}});
  const std::vector<std::string> models{"extract", "--base", path("model"), "--tuned", path("tuned"), "--out", path("l.safetensors")};
  auto with = [&](std::vector<std::string> extra) {
    std::vector<std::string> a = models;
    a.insert(a.end(), extra.begin(), extra.end());
    return loom(a);
  };
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases{
      {{}, "--rank"},
      {{"--rank", "0"}, "--rank"},
      {{"--rank", "2", "--conv-rank", "-1"}, "--conv-rank"},
      {{"--rank", "2", "--alpha", "nan"}, "--alpha"},
      {{"--rank", "2", "--min-diff", "-1"}, "--min-diff"},
      {{"--rank", "2", "--clamp-quantile", "1.5"}, "--clamp-quantile"},
      {{"--rank", "2", "--format", "foo"}, "--format"},
  };
  for (const auto& [extra, flag] : cases) {
    const Result r = with(extra);
    EXPECT_EQ(r.code, 2) << r;
    EXPECT_THAT(r.err, HasSubstr(flag)) << r;
  }
  EXPECT_FALSE(exists(path("l.safetensors")));
  for (const auto& [args, flag] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"resize", path("a"), path("b")}, "--rank"},
           {{"resize", path("a"), path("b"), "--energy", "1.5"}, "--energy"},
           {{"resize", path("a"), path("b"), "--energy", "0"}, "--energy"},
           {{"resize", path("a"), path("b"), "--rank", "0"}, "--rank"},
           {{"resize", path("a"), path("b"), "--rank", "2", "--format", "nope"}, "--format"}}) {
    const Result r = loom(args);
    EXPECT_EQ(r.code, 2) << r;
    EXPECT_THAT(r.err, HasSubstr(flag)) << r;
  }
  ASSERT_EQ(with({"--rank", "2"}).code, 0);
  const Result same = loom({"resize", path("l.safetensors"), path("l.safetensors"), "--rank", "1"});
  EXPECT_EQ(same.code, 2) << same;
  EXPECT_THAT(same.err, HasSubstr("is the input file"));
}

TEST_F(CliExtract, FileErrorsExitThreeNamingTheFileAndTheModule) {
  const Result missing = loom({"extract", "--base", path("model"), "--tuned", path("nosuch"), "--rank", "2", "--out", path("l.safetensors")});
  EXPECT_EQ(missing.code, 3) << missing;
  EXPECT_THAT(missing.err, HasSubstr(path("nosuch")));
  // another architecture: wider heads
  ModelSpec wide;
  wide.head_dim = 5;
  write_model_dir(path("wide"), wide);
  const Result shape = loom({"extract", "--base", path("model"), "--tuned", path("wide"), "--rank", "2", "--out", path("l.safetensors")});
  EXPECT_EQ(shape.code, 3) << shape;
  EXPECT_THAT(shape.err, AllOf(HasSubstr(path("wide")), HasSubstr("module 'proj_in' has the weight shape [10, 8, 1, 1]"),
                               HasSubstr("[8, 8, 1, 1]")));
  // identical models: nothing to extract
  const Result same = loom({"extract", "--base", path("model"), "--tuned", path("model"), "--rank", "2", "--out", path("l.safetensors")});
  EXPECT_EQ(same.code, 3) << same;
  EXPECT_THAT(same.err, HasSubstr("does not differ from the base model"));
  EXPECT_FALSE(exists(path("l.safetensors")));
  // resize: missing input, a file without LoRA modules, a Custom Diffusion-free data file
  const Result none = loom({"resize", path("nosuch.safetensors"), path("o.safetensors"), "--rank", "1"});
  EXPECT_EQ(none.code, 3) << none;
  EXPECT_THAT(none.err, HasSubstr(path("nosuch.safetensors")));
  const Result data = loom({"resize", path("data.safetensors"), path("o.safetensors"), "--rank", "1"});
  EXPECT_EQ(data.code, 3) << data;
  EXPECT_THAT(data.err, AllOf(HasSubstr(path("data.safetensors")), HasSubstr("holds no LoRA module")));
  EXPECT_FALSE(exists(path("o.safetensors")));
}

// A UNet2DConditionModel directory (the sd1 fixture) with one 3×3 conv and one attention changed.
TEST_F(CliExtract, UNetDirectoriesWithKxKConvsNeedConvRank) {
  const std::string sd1 = std::string(LOOM_SOURCE_DIR) + "/tests/unet/fixtures/sd1";
  fs::create_directories(path("unet_tuned"));
  fs::copy_file(sd1 + "/config.json", path("unet_tuned/config.json"));
  const std::string conv = "down_blocks.0.resnets.0.conv1", q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (auto [key, t] : io::read_safetensors(sd1 + "/diffusion_pytorch_model.safetensors").tensors) {
    if (key == conv + ".weight" || key == q + ".weight")
      t = ops::add(t.to(DType::F64), low_rank(t.size(0), t.numel() / t.size(0), 1, 3).reshape(t.shape())).to(t.dtype());
    tensors.emplace_back(key, t);
  }
  io::write_safetensors(path("unet_tuned/diffusion_pytorch_model.safetensors"), tensors);
  const std::vector<std::string> args{"extract", "--base", sd1, "--tuned", path("unet_tuned"), "--rank", "2", "--out",
                                      path("unet_lora.safetensors")};
  const Result plain = loom(args);
  ASSERT_EQ(plain.code, 0) << plain;
  EXPECT_THAT(plain.out, AllOf(HasSubstr("total: 1 modules written"), HasSubstr("3x3 conv: give --conv-rank")));
  std::vector<std::string> with_conv = args;
  with_conv.insert(with_conv.end(), {"--conv-rank", "1"});
  const Result locon = loom(with_conv);
  ASSERT_EQ(locon.code, 0) << locon;
  EXPECT_THAT(locon.out, HasSubstr("total: 2 modules written"));
  EXPECT_THAT(locon.out, HasSubstr("energy kept 1.000000"));
  const io::TensorFile f = io::read_tensor_file(path("unet_lora.safetensors"));
  ASSERT_NE(f.find("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"), nullptr);
  EXPECT_EQ(f.find("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")->shape(), (Shape{1, 8, 3, 3}));
  EXPECT_EQ(f.find("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight")->shape(), (Shape{8, 1, 1, 1}));

  // a NaN in a UNet weight file is a bad file naming the key (no checksum needed to see it)
  for (auto& [key, t] : tensors)
    if (key == q + ".weight") t = ops::mul_scalar(t, NAN);
  io::write_safetensors(path("unet_tuned/diffusion_pytorch_model.safetensors"), tensors);
  const Result nan = loom(args);
  EXPECT_EQ(nan.code, 3) << nan;
  EXPECT_THAT(nan.err, HasSubstr("key '" + q + ".weight' holds NaN or Inf"));
}

// ---- a model.h5 written by h5py (SPEC §5; issue 12: no checksums) ----------------------------------

std::string fixture(const std::string& name) { return std::string(LOOM_SOURCE_DIR) + "/tests/io/fixtures/" + name; }

class CliH5pyModel : public Cli {};  // (a suite name of this file: gtest needs one fixture class per suite)

TEST_F(CliH5pyModel, IsSaidToCarryNoChecksumsOnceAndStillCheckedForFiniteness) {
  // tests/io/fixtures/make_h5py_model.py: model.h5 by h5py, the same tensors in a safetensors file
  fs::copy(fixture("h5py_model"), path("h5"));
  fs::create_directories(path("st"));
  fs::copy_file(fixture("h5py_model/config.json"), path("st/config.json"));
  fs::copy_file(fixture("h5py_model_reference.safetensors"), path("st/model.safetensors"));
  write_data(path("data.safetensors"));
  const Result r = loom({"run", "--model", path("h5"), "--input", path("data.safetensors"), "--output", path("h5.safetensors")});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("--model: " + path("h5") + "/model.h5"), HasSubstr("carry no checksum")));
  EXPECT_EQ(r.err.find("carry no checksum"), r.err.rfind("carry no checksum")) << "said once";
  EXPECT_LT(rel_error(read_output(path("h5.safetensors")), run("st.safetensors", {}, "st")), 1e-7);
  const Result st = loom({"run", "--model", path("st"), "--input", path("data.safetensors"), "--output", path("st2.safetensors")});
  EXPECT_THAT(st.err, Not(HasSubstr("checksum")));  // nothing to say for a checked format

  // Damage that no checksum catches: one value of proj_out.weight made NaN in place.
  const Tensor w = *io::read_safetensors(fixture("h5py_model_reference.safetensors")).find("proj_out.weight");
  const std::string values(static_cast<const char*>(w.raw_data()), size_t(w.numel()) * 4);
  std::string bytes = read_bytes(path("h5/model.h5"));
  const size_t at = bytes.find(values);
  ASSERT_NE(at, std::string::npos);
  const float nan = NAN;
  std::memcpy(&bytes[at + 12], &nan, 4);
  write_bytes(path("h5/model.h5"), bytes);
  const Result bad = loom({"run", "--model", path("h5"), "--input", path("data.safetensors"), "--output", path("bad.safetensors")});
  EXPECT_EQ(bad.code, 3) << bad;
  EXPECT_THAT(bad.err, AllOf(HasSubstr(path("h5") + "/model.h5"), HasSubstr("'proj_out.weight' holds NaN")));
  EXPECT_FALSE(exists(path("bad.safetensors")));
}

}  // namespace
}  // namespace loom
