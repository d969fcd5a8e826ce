// Adapter files (io/adapter_io.h): LoRA key families in and out, conversions, spellings, prefixes, Custom Diffusion.
//
// Bad files and non-finite values: test_adapter_io_errors.cpp; model directories and checkpoints:
// test_model_dir_checkpoint.cpp (ctest -L io).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "adapters/custom_diffusion.h"
#include "adapters/lora.h"
#include "io/adapter_io.h"
#include "tensor/ops.h"
#include "tests/test_helpers.h"

namespace loom::io {
namespace {

using ::testing::HasSubstr;
using loom::testing::error_of;
using loom::testing::rel_error;
using loom::testing::TempDir;
using loom::testing::adapter_io::Inputs;
using loom::testing::adapter_io::run;
using loom::testing::adapter_io::tiny_config;
using loom::testing::adapter_io::tiny_inputs;
using loom::testing::adapter_io::tiny_model;
using loom::testing::adapter_io::trained_like;

// ---- LoRA families ---------------------------------------------------------------------

class LoraFamilies : public ::testing::TestWithParam<KeyFamily> {};

TEST_P(LoraFamilies, SaveLoadKeepsTheOutput) {
  TempDir dir;
  const Inputs in = tiny_inputs(DType::F32);
  auto model = tiny_model();
  Tensor want;
  {
    adapters::LoraSet set(model);
    adapters::LoraAdapter& a = trained_like(set, "a", 3, {"to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"});
    want = run(*model, in);
    save_lora(a, *model, dir.file("a.bin"), GetParam());
  }
  auto fresh = tiny_model();
  adapters::LoraSet set(fresh);
  const AdapterLoadReport r = load_lora(set, "a", dir.file("a.bin"));
  EXPECT_TRUE(r.clean()) << r.summary();
  EXPECT_TRUE(r.families.count(GetParam())) << r.summary();
  EXPECT_LE(rel_error(run(*fresh, in), want), 1e-6) << family_name(GetParam());
  EXPECT_NE(run(*fresh, in).to_vector(), run(*tiny_model(), in).to_vector());  // the adapter does something
}

INSTANTIATE_TEST_SUITE_P(Io, LoraFamilies,
                         ::testing::Values(KeyFamily::Peft, KeyFamily::Diffusers, KeyFamily::Kohya, KeyFamily::Loom),
                         [](const auto& info) { return std::string(family_name(info.param)) == "diffusers" ? "diffusers" : family_name(info.param); });

// What diffusers' load_lora_weights accepts (it rejects any key without "lora", e.g. `.alpha`):
// the scale alpha/r is folded into the up weights. (diffusers itself loads it: io_diffusers_interop.)
TEST(LoraWrite, DiffusersFilesHaveNoAlphaKeysAndTheScaleFoldedIntoUp) {
  TempDir dir;
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 41);
  save_lora(a, *model, dir.file("d.safetensors"), KeyFamily::Diffusers);
  const TensorFile f = read_safetensors(dir.file("d.safetensors"));
  EXPECT_EQ(f.tensors.size(), 2 * a.modules().size());
  for (const auto& [key, t] : f.tensors) EXPECT_THAT(key, HasSubstr("lora")) << key;
  for (const auto& [path, m] : a.modules()) {
    const Tensor* up = f.find("unet." + path + ".lora.up.weight");
    ASSERT_TRUE(up) << path;
    EXPECT_LE(rel_error(*up, ops::mul_scalar(m.up.tensor(), m.scale())), 1e-7) << path;
  }
}

// kohya: one alpha for every module (diffusers' kohya loader applies the most common alpha to
// attention modules); a module whose alpha differs has the ratio folded into its up weights.
TEST(LoraWrite, KohyaFilesCarryOneAlphaAndFoldTheRest) {
  TempDir dir;
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 42);  // alpha 3, attn1.to_v 1.5; attn2.to_k rank 3
  save_lora(a, *model, dir.file("k.safetensors"), KeyFamily::Kohya);
  const TensorFile f = read_safetensors(dir.file("k.safetensors"));
  for (const auto& [key, t] : f.tensors) {
    if (key.size() > 6 && key.substr(key.size() - 6) == ".alpha") {
      EXPECT_EQ(t.item(), 3.0) << key;
    }
  }
  const std::string v = "transformer_blocks.0.attn1.to_v", k = "transformer_blocks.0.attn2.to_k";
  const Tensor* up_v = f.find("lora_unet_" + std::string("transformer_blocks_0_attn1_to_v") + ".lora_up.weight");
  const Tensor* up_k = f.find("lora_unet_" + std::string("transformer_blocks_0_attn2_to_k") + ".lora_up.weight");
  ASSERT_TRUE(up_v && up_k);
  EXPECT_LE(rel_error(*up_v, ops::mul_scalar(a.modules().at(v).up.tensor(), 0.5)), 1e-7);  // 1.5 / 3
  EXPECT_EQ(up_k->to_vector(), a.modules().at(k).up.tensor().to_vector());  // alpha 3 (scale 1): untouched
}

TEST(LoraConvert, EveryPairOfFamiliesRoundTripsTheOutput) {
  TempDir dir;
  const Inputs in = tiny_inputs(DType::F32);
  auto model = tiny_model();
  adapters::LoraSet set(model);
  trained_like(set, "src", 9);
  const Tensor want = run(*model, in);
  const std::vector<KeyFamily> families{KeyFamily::Peft, KeyFamily::Diffusers, KeyFamily::Kohya, KeyFamily::Loom};
  for (KeyFamily from : families)
    for (KeyFamily to : families) {
      save_lora(set.adapter("src"), *model, dir.file("from"), from);
      auto m1 = tiny_model();
      adapters::LoraSet s1(m1);
      load_lora(s1, "x", dir.file("from"));
      save_lora(s1.adapter("x"), *m1, dir.file("to"), to);
      auto m2 = tiny_model();
      adapters::LoraSet s2(m2);
      load_lora(s2, "y", dir.file("to"));
      EXPECT_LE(rel_error(run(*m2, in), want), 1e-6) << family_name(from) << " -> " << family_name(to);
    }
}

TEST(LoraConvert, FileConversionWithoutAModelKeepsTheOutput) {
  TempDir dir;
  const Inputs in = tiny_inputs(DType::F32);
  auto model = tiny_model();
  adapters::LoraSet set(model);
  trained_like(set, "src", 13, {"to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj"});
  const Tensor want = run(*model, in);
  const std::vector<KeyFamily> families{KeyFamily::Peft, KeyFamily::Diffusers, KeyFamily::Kohya, KeyFamily::Loom};
  for (KeyFamily from : families)
    for (KeyFamily to : families) {
      save_lora(set.adapter("src"), *model, dir.file("in"), from, "down_blocks.2.attentions.1");
      convert_adapter_file(dir.file("in"), dir.file("out"), to);
      auto fresh = tiny_model();
      adapters::LoraSet s(fresh);
      AdapterLoadOptions o;
      o.prefix = "down_blocks.2.attentions.1";
      const AdapterLoadReport r = load_lora(s, "c", dir.file("out"), o);
      EXPECT_TRUE(r.families.count(to)) << r.summary();
      EXPECT_LE(rel_error(run(*fresh, in), want), 1e-6) << family_name(from) << " -> " << family_name(to);
    }
}

TEST(LoraRead, KohyaNamesSplitBackIntoDiffusersPaths) {
  EXPECT_EQ(kohya_to_path("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0"),
            "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0");
  EXPECT_EQ(kohya_to_path("lora_unet_mid_block_attentions_0_proj_in"), "mid_block.attentions.0.proj_in");
  EXPECT_EQ(kohya_to_path("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj"),
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj");
  EXPECT_EQ(kohya_to_path("lora_te_text_model_encoder_layers_0_mlp_fc1"), "");
}

// kohya's SGM/LDM numbering: every name sd-scripts writes for SD 1.x and SDXL, mapped as diffusers'
// own loader maps it (golden: tests/io/fixtures/make_sgm_names.py runs diffusers' conversion).
TEST(LoraRead, KohyaSgmNamesMapAsDiffusersMapsThemBothWays) {
  std::ifstream in(std::string(LOOM_IO_FIXTURES) + "/sgm_names.json");
  ASSERT_TRUE(in.good());
  const nlohmann::json golden = nlohmann::json::parse(in);
  for (const std::string layout : {"sd15", "sdxl"}) {
    ASSERT_GT(golden.at(layout).size(), 250u);
    const std::set<int> no_attention = layout == "sd15" ? std::set<int>{0} : std::set<int>{};
    for (const auto& [kohya, path] : golden.at(layout).items()) {
      EXPECT_TRUE(is_sgm_kohya_name(kohya)) << kohya;
      EXPECT_EQ(kohya_to_path(kohya), path.get<std::string>()) << layout << " " << kohya;
      std::string sgm = path_to_sgm(path.get<std::string>(), no_attention);
      std::replace(sgm.begin(), sgm.end(), '.', '_');
      EXPECT_EQ("lora_unet_" + sgm, kohya) << layout << " " << path;
    }
  }
  // SD 1.x's first up block has no attention: its Upsample is sub-index 1 (diffusers maps every
  // sub-index 1 to an attention that block does not have; loom maps it to the upsampler).
  EXPECT_EQ(kohya_to_path("lora_unet_output_blocks_2_1_conv"), "up_blocks.0.upsamplers.0.conv");
  EXPECT_EQ(path_to_sgm("up_blocks.0.upsamplers.0.conv", {0}), "output_blocks.2.1.conv");
  EXPECT_EQ(sgm_to_path("time_embed.0"), "time_embedding.linear_1");
  EXPECT_EQ(path_to_sgm("add_embedding.linear_2"), "label_emb.0.2");
  EXPECT_EQ(sgm_to_path("down_blocks.0.attentions.0.proj_in"), "");
  EXPECT_EQ(path_to_sgm("down_blocks.0.attentions.0.weird.0"), "input_blocks.1.1.weird.0");
  EXPECT_EQ(path_to_sgm("mid_block.attentions.1.proj_in"), "");
}

TEST(LoraConvert, KohyaSgmFilesLoadIntoTheirBlockAndConvertBothWays) {
  TempDir dir;
  const Inputs in = tiny_inputs(DType::F32);
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 31, {"to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"});
  const Tensor want = run(*model, in);
  // The adapter as SDXL's down_blocks.1.attentions.0 (= input_blocks.4.1), plus the same weights
  // as the middle block (middle_block.1) and an up block (output_blocks.1.1).
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const std::string block : {"down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.1"}) {
    const auto t = lora_tensors(a, *model, KeyFamily::Kohya, block, nullptr);
    tensors.insert(tensors.end(), t.begin(), t.end());
  }
  write_safetensors(dir.file("diffusers_numbering.safetensors"), tensors);
  const ConvertReport cr = convert_adapter_file(dir.file("diffusers_numbering.safetensors"), dir.file("sgm.safetensors"),
                                                KeyFamily::Kohya, WriteOptions{true});
  EXPECT_EQ(cr.unet_modules, 3 * a.modules().size());
  const TensorFile sgm = read_safetensors(dir.file("sgm.safetensors"));
  std::set<std::string> heads;
  for (const auto& [key, t] : sgm.tensors) {
    EXPECT_TRUE(is_sgm_kohya_name(key.substr(0, key.find('.')))) << key;
    heads.insert(key.substr(0, key.find("_transformer_blocks") == std::string::npos ? key.find("_proj") : key.find("_transformer_blocks")));
  }
  EXPECT_EQ(heads, (std::set<std::string>{"lora_unet_input_blocks_4_1", "lora_unet_middle_block_1", "lora_unet_output_blocks_1_1"}));
  for (const std::string block : {"down_blocks.1.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.1"}) {
    auto fresh = tiny_model();
    adapters::LoraSet s(fresh);
    AdapterLoadOptions o;
    o.prefix = block;
    const AdapterLoadReport r = load_lora(s, "sgm", dir.file("sgm.safetensors"), o);
    EXPECT_EQ(r.outside_prefix.size(), 2 * tensors.size() / 3) << block << ": " << r.summary();
    EXPECT_LE(rel_error(run(*fresh, in), want), 1e-6) << block;
  }
  // Back to diffusers' numbering without a model, then PEFT: same keys as written at first.
  convert_adapter_file(dir.file("sgm.safetensors"), dir.file("peft.safetensors"), KeyFamily::Peft);
  const TensorFile peft = read_safetensors(dir.file("peft.safetensors"));
  EXPECT_EQ(peft.tensors.size(), 2 * sgm.tensors.size() / 3);
  EXPECT_TRUE(peft.find("unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0.lora_A.weight"));
  EXPECT_TRUE(peft.find("unet.up_blocks.0.attentions.1.proj_in.lora_B.weight"));
  EXPECT_THAT(error_of([&] {
                convert_adapter_file(dir.file("sgm.safetensors"), dir.file("x.safetensors"), KeyFamily::Peft, WriteOptions{true});
              }),
              HasSubstr("SGM"));
}

// Text-encoder modules are never dropped: convert carries them through in every family (renamed),
// and reports the count; a run on a UNet block reports them as not for this model.
TEST(LoraConvert, TextEncoderKeysAreCarriedThroughEveryFamilyAndCounted) {
  TempDir dir;
  const Inputs in = tiny_inputs(DType::F32);
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 51);
  const Tensor want = run(*model, in);
  auto tensors = lora_tensors(a, *model, KeyFamily::Kohya, "down_blocks.1.attentions.0", nullptr);
  // SDXL's two text encoders as sd-scripts names them, with alphas.
  Generator gen(52);
  const std::vector<std::string> te_names{"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                          "lora_te1_text_model_encoder_layers_11_mlp_fc2",
                                          "lora_te2_text_model_encoder_layers_3_self_attn_out_proj"};
  std::map<std::string, Tensor> te_delta;  // ΔW = (alpha / r)·up·down of each text-encoder module
  for (const std::string& n : te_names) {
    tensors.emplace_back(n + ".lora_down.weight", Tensor::randn({2, 6}, gen));
    tensors.emplace_back(n + ".lora_up.weight", Tensor::randn({6, 2}, gen));
    tensors.emplace_back(n + ".alpha", Tensor::scalar(2.0, DType::F32));  // scale 1: nothing folded
    te_delta[n] = ops::matmul(tensors[tensors.size() - 2].second, tensors[tensors.size() - 3].second);
  }
  write_safetensors(dir.file("sdxl_kohya.safetensors"), tensors);

  const std::map<KeyFamily, std::string> q_proj_key{
      {KeyFamily::Peft, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"},
      {KeyFamily::Diffusers, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight"},
      {KeyFamily::Loom, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"},
      {KeyFamily::Kohya, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"}};
  for (const auto& [family, key] : q_proj_key) {
    const std::string out = dir.file(std::string("out_") + family_name(family));
    const ConvertReport r = convert_adapter_file(dir.file("sdxl_kohya.safetensors"), out, family);
    EXPECT_EQ(r.text_encoder_modules, 3u) << family_name(family);
    EXPECT_EQ(r.unet_modules, a.modules().size()) << family_name(family);
    EXPECT_THAT(r.summary(), HasSubstr("3 text-encoder modules"));
    const TensorFile f = read_tensor_file(out);
    EXPECT_TRUE(f.find(key)) << family_name(family) << ": " << key;
    // Back to kohya: the names sd-scripts wrote, the same ΔW (an alpha may be folded into up).
    convert_adapter_file(out, dir.file("back.safetensors"), KeyFamily::Kohya);
    const TensorFile back = read_safetensors(dir.file("back.safetensors"));
    for (const std::string& n : te_names) {
      const Tensor *up = back.find(n + ".lora_up.weight"), *down = back.find(n + ".lora_down.weight"),
                   *alpha = back.find(n + ".alpha");
      ASSERT_TRUE(up && down && alpha) << family_name(family) << ": " << n;
      EXPECT_LE(rel_error(ops::mul_scalar(ops::matmul(*up, *down), alpha->item() / 2), te_delta[n]), 1e-6)
          << family_name(family) << ": " << n;
    }
    // A run on the UNet block: the UNet part loads; the text-encoder keys are counted, not unmatched.
    auto fresh = tiny_model();
    adapters::LoraSet s(fresh);
    AdapterLoadOptions o;
    o.prefix = "down_blocks.1.attentions.0";
    const AdapterLoadReport lr = load_lora(s, "x", out, o);
    EXPECT_EQ(lr.text_encoder.size(), family == KeyFamily::Kohya ? 9u : 6u) << family_name(family) << ": " << lr.summary();
    EXPECT_THAT(lr.summary(), HasSubstr("text-encoder keys (not for this model)"));
    EXPECT_LE(rel_error(run(*fresh, in), want), 1e-6) << family_name(family);
  }
  // diffusers' own text-encoder spellings (to_q_lora, lora_linear_layer) are read too.
  write_safetensors(dir.file("te_legacy.safetensors"),
                    {{"text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight", Tensor::randn({2, 6}, gen)},
                     {"text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight", Tensor::randn({6, 2}, gen)},
                     {"text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight", Tensor::randn({2, 6}, gen)},
                     {"text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight", Tensor::randn({6, 2}, gen)}});
  const RawLora legacy = read_raw_lora(read_safetensors(dir.file("te_legacy.safetensors")), "te_legacy.safetensors");
  EXPECT_TRUE(legacy.skipped.empty());
  EXPECT_TRUE(legacy.modules.count("text_encoder.text_model.encoder.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(legacy.modules.count("text_encoder.text_model.encoder.layers.0.mlp.fc1"));
  EXPECT_EQ(kohya_text_encoder_path("lora_te_text_model_encoder_layers_10_self_attn_k_proj"),
            "text_encoder.text_model.encoder.layers.10.self_attn.k_proj");
  EXPECT_EQ(kohya_text_encoder_path("lora_te2_text_projection"), "text_encoder_2.text_projection");
}

TEST(LoraRead, LegacyDiffusersAndMixedSpellingsInOneFile) {
  TempDir dir;
  const Inputs in = tiny_inputs(DType::F32);
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraConfig cfg;
  cfg.rank = 2;  // no alpha: scale 1
  Generator gen(4);
  adapters::LoraAdapter& a = set.add("a", cfg, gen);
  std::vector<std::pair<std::string, Tensor>> tensors;
  int i = 0;
  for (const auto& [path, m] : a.modules()) {
    m.up.tensor().copy_(Tensor::randn(m.up.shape(), gen, DType::F32, Device::cpu(), 0.0, 0.5));
    const std::string proc = path.substr(0, path.rfind(".to_"));
    std::string proj = path.substr(path.rfind(".to_") + 1);
    switch (i++ % 3) {
      case 0:  // legacy: …attn1.processor.to_q_lora.down.weight, to_out_lora for to_out.0
        if (proj == "to_out.0") proj = "to_out";
        tensors.emplace_back("unet." + proc + ".processor." + proj + "_lora.down.weight", m.down.tensor());
        tensors.emplace_back("unet." + proc + ".processor." + proj + "_lora.up.weight", m.up.tensor());
        break;
      case 1:
        tensors.emplace_back("unet." + path + ".lora.down.weight", m.down.tensor());
        tensors.emplace_back("unet." + path + ".lora.up.weight", m.up.tensor());
        break;
      default:
        tensors.emplace_back("unet." + path + ".lora_A.weight", m.down.tensor());
        tensors.emplace_back("unet." + path + ".lora_B.weight", m.up.tensor());
    }
  }
  const Tensor want = run(*model, in);
  write_safetensors(dir.file("mixed.safetensors"), tensors);
  auto fresh = tiny_model();
  adapters::LoraSet s(fresh);
  const AdapterLoadReport r = load_lora(s, "m", dir.file("mixed.safetensors"));
  EXPECT_EQ(r.families.size(), 3u) << r.summary();
  EXPECT_EQ(r.alphas_defaulted.size(), a.modules().size());
  EXPECT_LE(rel_error(run(*fresh, in), want), 1e-6);
}

TEST(LoraRead, KohyaAlphaOfAnyDtypeAndPeftMetadata) {
  TempDir dir;
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 21);
  std::map<std::string, std::string> meta;
  auto tensors = lora_tensors(a, *model, KeyFamily::Kohya, "", &meta);
  for (auto& [key, t] : tensors)  // alphas as i64 or f16, as kohya files have them
    if (key.size() > 6 && key.substr(key.size() - 6) == ".alpha")
      t = t.item() == std::round(t.item()) ? Tensor::from_vector(std::vector<int64_t>{int64_t(t.item())}, {})
                                           : t.to(DType::F16);
  write_safetensors(dir.file("k.safetensors"), tensors, meta);
  auto fresh = tiny_model();
  adapters::LoraSet s(fresh);
  const AdapterLoadReport r = load_lora(s, "k", dir.file("k.safetensors"));
  EXPECT_EQ(r.alphas_found.size(), a.modules().size());
  for (const auto& [path, m] : a.modules()) {  // the same ΔW = scale·B·A (an alpha may be folded into B)
    const auto& got = s.adapter("k").modules().at(path);
    EXPECT_LE(rel_error(ops::mul_scalar(ops::matmul(got.up.tensor(), got.down.tensor()), got.scale()),
                        ops::mul_scalar(ops::matmul(m.up.tensor(), m.down.tensor()), m.scale())),
              1e-3)
        << path;
  }

  save_lora(a, *model, dir.file("p.safetensors"), KeyFamily::Peft);  // alphas only in lora_adapter_metadata
  auto fresh2 = tiny_model();
  adapters::LoraSet s2(fresh2);
  const AdapterLoadReport r2 = load_lora(s2, "p", dir.file("p.safetensors"));
  for (const auto& [path, m] : a.modules()) {
    EXPECT_EQ(s2.adapter("p").modules().at(path).rank, m.rank) << path;
    EXPECT_DOUBLE_EQ(s2.adapter("p").modules().at(path).scale(), m.scale()) << path;
  }
}

TEST(LoraRead, PrefixSelectsOneBlockOfAFullUnetFile) {
  TempDir dir;
  const Inputs in = tiny_inputs(DType::F32);
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 5);
  const Tensor want = run(*model, in);
  for (KeyFamily family : {KeyFamily::Peft, KeyFamily::Kohya}) {
    // The same adapter as block down_blocks.1.attentions.0 of a UNet, plus another block's keys.
    std::map<std::string, std::string> meta;  // PEFT keeps its alphas in the metadata
    auto tensors = lora_tensors(a, *model, family, "down_blocks.1.attentions.0", &meta);
    auto other = lora_tensors(a, *model, family, "up_blocks.2.attentions.1", nullptr);
    tensors.insert(tensors.end(), other.begin(), other.end());
    write_safetensors(dir.file("unet.safetensors"), tensors, meta);
    auto fresh = tiny_model();
    adapters::LoraSet s(fresh);
    AdapterLoadOptions o;
    o.prefix = "down_blocks.1.attentions.0";
    const AdapterLoadReport r = load_lora(s, "u", dir.file("unet.safetensors"), o);
    EXPECT_EQ(r.outside_prefix.size(), other.size()) << family_name(family);
    EXPECT_LE(rel_error(run(*fresh, in), want), 1e-6) << family_name(family);
    auto fresh2 = tiny_model();
    adapters::LoraSet s2(fresh2);
    o.prefix = "mid_block.attentions.0";
    EXPECT_THAT(error_of([&] { load_lora(s2, "u", dir.file("unet.safetensors"), o); }), HasSubstr("prefix"));
  }
}

TEST(LoraWrite, LoomHdf5CarriesRankAlphaConventionTargetsAndFingerprint) {
  TempDir dir;
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 1);
  save_lora(a, *model, dir.file("a.h5"), KeyFamily::Loom);
  const TensorFile f = read_hdf5(dir.file("a.h5"));
  EXPECT_EQ(std::get<std::string>(f.attributes.at("format")), "loom");
  EXPECT_EQ(std::get<std::string>(f.attributes.at("kind")), "lora");
  EXPECT_THAT(std::get<std::string>(f.attributes.at("targets")), HasSubstr("to_q"));
  EXPECT_FALSE(std::get<std::string>(f.attributes.at("base_fingerprint")).empty());
  const Attributes& k = f.group_attributes.at("transformer_blocks.0.attn2.to_k");
  EXPECT_EQ(std::get<int64_t>(k.at("rank")), 3);
  EXPECT_DOUBLE_EQ(std::get<double>(k.at("alpha")), 3.0);
  EXPECT_EQ(std::get<std::string>(k.at("scaling")), "alpha/r");

  // A different base: the load works and notes the fingerprint.
  Generator gen(99);
  auto other = std::make_shared<attention::Transformer2DModel>(tiny_config(), gen);
  adapters::LoraSet s(other);
  const AdapterLoadReport r = load_lora(s, "a", dir.file("a.h5"));
  ASSERT_FALSE(r.notes.empty());
  EXPECT_THAT(r.notes[0], HasSubstr("different base weights"));
}

// ---- Custom Diffusion -------------------------------------------------------------------

TEST(CustomDiffusionFiles, SaveLoadKeepsTheOutputInBothFormats) {
  TempDir dir;
  const Inputs in = tiny_inputs(DType::F32);
  for (const std::string recipe : {"crossattn_kv", "crossattn"})
    for (const std::string file : {"cd.safetensors", "cd.h5"}) {
      auto model = tiny_model();
      const auto params = adapters::apply_custom_diffusion(*model, recipe);
      Generator gen(3);
      for (const auto& [name, p] : params)
        p.tensor().copy_(ops::add(p.tensor(), Tensor::randn(p.shape(), gen, DType::F32, Device::cpu(), 0.0, 0.1)));
      const Tensor want = run(*model, in);
      save_custom_diffusion(*model, dir.file(file), "down_blocks.0.attentions.1");
      const TensorFile f = read_tensor_file(dir.file(file));
      EXPECT_EQ(f.tensors.front().first.rfind("down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.", 0), 0u)
          << f.tensors.front().first;
      auto fresh = tiny_model();
      AdapterLoadOptions o;
      o.prefix = "down_blocks.0.attentions.1";
      const AdapterLoadReport r = load_custom_diffusion(*fresh, dir.file(file), o);
      EXPECT_TRUE(r.clean()) << r.summary();
      EXPECT_LE(rel_error(run(*fresh, in), want), 1e-6) << recipe << " " << file;
    }
}

}  // namespace
}  // namespace loom::io
