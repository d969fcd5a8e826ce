// `loom inspect / run / convert / train` with LyCORIS (LoHa, LoKr) and DoRA files
// (tests/adapters/fixtures/lycoris, made by make_lycoris_fixtures.py).
#include "tests/cli/cli_fixture.h"

namespace loom {
namespace {

std::string fixture(const std::string& name) { return std::string(LOOM_LYCORIS_FIXTURES) + "/" + name; }

const io::TensorFile& inputs() {
  static const io::TensorFile f = io::read_safetensors(fixture("inputs.safetensors"));
  return f;
}

// hidden_states, encoder_hidden_states (f32) and, for training, a target.
std::string write_data(const loom::testing::TempDir& dir, bool with_target) {
  std::vector<std::pair<std::string, Tensor>> t = {
      {"hidden_states", inputs().find("hidden_states")->to(DType::F32)},
      {"encoder_hidden_states", inputs().find("encoder_hidden_states")->to(DType::F32)}};
  if (with_target) t.emplace_back("target", inputs().find("loha")->to(DType::F32));
  const std::string path = dir / (with_target ? "train.safetensors" : "in.safetensors");
  io::write_safetensors(path, t, {});
  return path;
}

TEST(CliLycoris, InspectShowsKindsRanksAndScales) {
  loom::testing::TempDir dir;
  Result r = run_loom({"inspect", fixture("loha.safetensors")}, dir.path());
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.out, HasSubstr("transformer_blocks.0.attn1.to_q  LoHa  r=2  alpha=1.500000  scale=0.75"));
  r = run_loom({"inspect", fixture("lokr_full.safetensors")}, dir.path());
  EXPECT_THAT(r.out, HasSubstr("LoKr  r=0  alpha=5.000000  scale=1"));
  r = run_loom({"inspect", fixture("dora_peft.safetensors")}, dir.path());
  EXPECT_THAT(r.out, HasSubstr("LoRA+DoRA"));
  EXPECT_THAT(r.out, HasSubstr("magnitude=lora_magnitude_vector"));
}

TEST(CliLycoris, RunAppliesWeightedAdaptersFusedOrNot) {
  loom::testing::TempDir dir;
  const std::string in = write_data(dir, false);
  for (const char* fuse : {"", "--fuse"}) {
    std::vector<std::string> args = {"run", "--model", fixture("model"), "--input", in, "--output", dir / "out.safetensors",
                                     "--adapter", fixture("loha.safetensors") + ":1", "--adapter",
                                     fixture("lokr_factored.safetensors") + ":0.5"};
    if (*fuse) args.push_back(fuse);
    const Result r = run_loom(args, dir.path());
    ASSERT_EQ(r.code, 0) << r;
    EXPECT_THAT(r.err, HasSubstr("11 LoHa modules"));
    EXPECT_THAT(r.err, HasSubstr("11 LoKr modules"));
    EXPECT_LE(rel_error(read_output(dir / "out.safetensors").to(DType::F64), inputs().find("loha_plus_lokr_w05")->to(DType::F64)),
              1e-5);
  }
  // A malformed file is a bad input file (exit 3) naming the key.
  io::TensorFile bad = io::read_safetensors(fixture("loha.safetensors"));
  bad.tensors.erase(std::remove_if(bad.tensors.begin(), bad.tensors.end(),
                                   [](const auto& p) { return p.first == "lora_unet_proj_in.hada_w1_a"; }),
                    bad.tensors.end());
  io::write_safetensors(dir / "bad.safetensors", bad.tensors, bad.metadata);
  const Result r = run_loom({"run", "--model", fixture("model"), "--input", in, "--output", dir / "o2.safetensors",
                             "--adapter", dir / "bad.safetensors"},
                            dir.path());
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, HasSubstr("hada_w1_a"));
  EXPECT_FALSE(exists(dir / "o2.safetensors"));
}

TEST(CliLycoris, ConvertWritesKohyaOrRefusesNamingTheKind) {
  loom::testing::TempDir dir;
  Result r = run_loom({"convert", fixture("lokr_factored.safetensors"), dir / "k.safetensors", "--to", "kohya"}, dir.path());
  EXPECT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.all(), HasSubstr("11 UNet modules"));
  r = run_loom({"convert", fixture("lokr_factored.safetensors"), dir / "d.safetensors", "--to", "diffusers"}, dir.path());
  EXPECT_NE(r.code, 0) << r;
  EXPECT_THAT(r.err, HasSubstr("is a LoKr (LyCORIS), which the diffusers format cannot hold"));
  EXPECT_FALSE(exists(dir / "d.safetensors"));
}

TEST(CliLycoris, TrainingFromALycorisFileIsRefusedWithAReason) {
  loom::testing::TempDir dir;
  const std::string data = write_data(dir, true);
  const Result r = run_loom({"train", "--model", fixture("model"), "--data", data, "--init-adapter",
                             fixture("loha.safetensors"), "--steps", "1", "--out", dir / "run"},
                            dir.path());
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("loom trains plain LoRA only"));
}

}  // namespace
}  // namespace loom
