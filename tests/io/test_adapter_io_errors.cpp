// Adapter files (io/adapter_io.h): bad alphas, shapes and non-finite weights as named errors; writers refusing them.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "adapters/custom_diffusion.h"
#include "adapters/lora.h"
#include "io/adapter_io.h"
#include "tests/test_helpers.h"

namespace loom::io {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;
using loom::testing::error_of;
using loom::testing::TempDir;
using loom::testing::adapter_io::tiny_model;
using loom::testing::adapter_io::trained_like;

// A bad alpha is a bad file (exit 3 at load time), never a NaN output at run time.
TEST(LoraRead, BadKohyaAlphasAreFileErrorsNamingTheKey) {
  TempDir dir;
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 21);
  const std::vector<std::pair<std::string, Tensor>> bad_alphas{
      {"two values", Tensor::from_values({1.0, 2.0}, {2})},
      {"empty", Tensor::zeros({0})},
      {"a matrix", Tensor::from_values({4.0}, {1, 1})},
      {"NaN", Tensor::scalar(NAN, DType::F32)},
      {"Inf", Tensor::scalar(INFINITY, DType::F32)},
      {"-Inf in f16", Tensor::scalar(-INFINITY, DType::F32).to(DType::F16)}};
  for (const auto& [what, bad] : bad_alphas) {
    auto tensors = lora_tensors(a, *model, KeyFamily::Kohya, "", nullptr);
    std::string alpha_key;
    for (auto& [key, t] : tensors)
      if (alpha_key.empty() && key.size() > 6 && key.substr(key.size() - 6) == ".alpha") alpha_key = key, t = bad;
    write_safetensors(dir.file("k.safetensors"), tensors);
    auto fresh = tiny_model();
    adapters::LoraSet s(fresh);
    for (bool strict : {true, false}) {
      AdapterLoadOptions o;
      o.strict = strict;
      bool file_error = false;
      std::string err;
      try {
        load_lora(s, "k", dir.file("k.safetensors"), o);
      } catch (const FileError& e) {
        file_error = true, err = e.what();
      }
      EXPECT_TRUE(file_error) << what;
      EXPECT_THAT(err, HasSubstr(alpha_key)) << what;
      EXPECT_THAT(err, HasSubstr("k.safetensors")) << what;
    }
    EXPECT_FALSE(s.has("k"));
    // Without a model (inspect, convert): the same error, and no output file.
    EXPECT_THAT(error_of([&] { convert_adapter_file(dir.file("k.safetensors"), dir.file("out.safetensors"), KeyFamily::Peft); }),
                HasSubstr(alpha_key)) << what;
    EXPECT_FALSE(fs::exists(dir.file("out.safetensors"))) << what;
  }
}

TEST(LoraRead, NullOrNonFiniteAlphasInPeftMetadataAreFileErrors) {
  TempDir dir;
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 22);
  const auto tensors = lora_tensors(a, *model, KeyFamily::Peft, "", nullptr);
  for (const std::string meta : {R"({"unet.r": 2, "unet.lora_alpha": null})", R"({"r": 2, "lora_alpha": 3, "alpha_pattern": {"to_v": null}})",
                                 R"({"r": null, "lora_alpha": 3})"}) {
    write_safetensors(dir.file("p.safetensors"), tensors, {{"lora_adapter_metadata", meta}});
    auto fresh = tiny_model();
    adapters::LoraSet s(fresh);
    const std::string err = error_of([&] { load_lora(s, "p", dir.file("p.safetensors")); });
    EXPECT_THAT(err, HasSubstr("lora_adapter_metadata")) << meta;
    EXPECT_THAT(err, HasSubstr("null")) << meta;
  }
  // A loom HDF5 file whose module attribute says alpha = NaN.
  std::map<std::string, Attributes> groups{{"transformer_blocks.0.attn1.to_q", {{"alpha", double(NAN)}, {"rank", int64_t(2)}}}};
  write_hdf5(dir.file("l.h5"), lora_tensors(a, *model, KeyFamily::Loom, "", nullptr),
             {{"format", std::string("loom")}, {"kind", std::string("lora")}}, groups);
  auto fresh = tiny_model();
  adapters::LoraSet s(fresh);
  const std::string err = error_of([&] { load_lora(s, "l", dir.file("l.h5")); });
  EXPECT_THAT(err, HasSubstr("transformer_blocks.0.attn1.to_q"));
  EXPECT_THAT(err, HasSubstr("NaN"));
}

TEST(LoraWrite, WritersRefuseNonFiniteAlphasAndConvertRefusesNonFiniteCustomDiffusion) {
  TempDir dir;
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraConfig cfg;
  cfg.rank = 2, cfg.alpha = NAN;
  Generator gen(23);
  adapters::LoraAdapter& a = set.add("a", cfg, gen);
  for (KeyFamily f : {KeyFamily::Peft, KeyFamily::Diffusers, KeyFamily::Kohya, KeyFamily::Loom}) {
    EXPECT_THAT(error_of([&] { save_lora(a, *model, dir.file("a.out"), f); }), HasSubstr("non-finite alpha")) << family_name(f);
    EXPECT_FALSE(fs::exists(dir.file("a.out")));
  }
  auto cd = tiny_model();
  const auto params = adapters::apply_custom_diffusion(*cd, "crossattn");
  save_custom_diffusion(*cd, dir.file("cd.safetensors"));
  auto tensors = read_safetensors(dir.file("cd.safetensors")).tensors;
  std::vector<double> v = tensors[0].second.to_vector();
  v[1] = NAN;
  tensors[0].second = Tensor::from_values(v, tensors[0].second.shape());
  write_safetensors(dir.file("cd_nan.safetensors"), tensors);
  bool file_error = false;
  try {
    convert_adapter_file(dir.file("cd_nan.safetensors"), dir.file("cd.h5"), KeyFamily::Loom);
  } catch (const FileError& e) {
    file_error = true;
    EXPECT_THAT(e.what(), HasSubstr(tensors[0].first));
  }
  EXPECT_TRUE(file_error);
  EXPECT_FALSE(fs::exists(dir.file("cd.h5")));
}

TEST(LoraRead, StrictErrorsNameTheKeyAndBothShapes) {
  TempDir dir;
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 2);
  auto tensors = lora_tensors(a, *model, KeyFamily::Peft, "", nullptr);
  tensors[0].second = Tensor::zeros({2, 7});  // wrong in_features
  write_safetensors(dir.file("bad.safetensors"), tensors);
  auto fresh = tiny_model();
  adapters::LoraSet s(fresh);
  const std::string err = error_of([&] { load_lora(s, "b", dir.file("bad.safetensors")); });
  EXPECT_THAT(err, HasSubstr(tensors[0].first));
  EXPECT_THAT(err, HasSubstr("[2, 7]"));
  EXPECT_THAT(err, HasSubstr("wrong base model or prefix?"));
  EXPECT_FALSE(s.has("b"));  // nothing partly loaded

  AdapterLoadOptions lenient;
  lenient.strict = false;
  const AdapterLoadReport r = load_lora(s, "b", dir.file("bad.safetensors"), lenient);
  EXPECT_EQ(r.shape_mismatches.size(), 1u);

  auto extra = lora_tensors(a, *model, KeyFamily::Peft, "", nullptr);
  extra.emplace_back("unet.transformer_blocks.7.attn1.to_q.lora_A.weight", Tensor::zeros({2, 6}));
  write_safetensors(dir.file("extra.safetensors"), extra);
  EXPECT_THAT(error_of([&] { load_lora(s, "c", dir.file("extra.safetensors")); }),
              HasSubstr("transformer_blocks.7.attn1.to_q.lora_A.weight"));
}

TEST(LoraRead, AFileThatMatchesNothingIsAnError) {
  TempDir dir;
  write_safetensors(dir.file("other.safetensors"), {{"some.unrelated.weight", Tensor::zeros({2, 2})}});
  auto model = tiny_model();
  adapters::LoraSet s(model);
  AdapterLoadOptions lenient;
  lenient.strict = false;
  EXPECT_THAT(error_of([&] { load_lora(s, "x", dir.file("other.safetensors"), lenient); }),
              HasSubstr("no LoRA key matches"));
}

TEST(LoraRead, NonFiniteWeightsAreReportedAndRefusedByStrictLoads) {
  TempDir dir;
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 8);
  auto tensors = lora_tensors(a, *model, KeyFamily::Peft, "", nullptr);
  std::vector<double> v = tensors[1].second.to_vector();
  v[0] = NAN;
  tensors[1].second = Tensor::from_values(v, tensors[1].second.shape());
  write_safetensors(dir.file("nan.safetensors"), tensors);
  auto fresh = tiny_model();
  adapters::LoraSet s(fresh);
  EXPECT_THAT(error_of([&] { load_lora(s, "n", dir.file("nan.safetensors")); }), HasSubstr("NaN"));
  AdapterLoadOptions lenient;
  lenient.strict = false;
  EXPECT_EQ(load_lora(s, "n", dir.file("nan.safetensors"), lenient).non_finite.size(), 1u);
}

TEST(LoraWrite, RefusesNonFiniteWeightsAndKeepsThePreviousFile) {
  TempDir dir;
  auto model = tiny_model();
  adapters::LoraSet set(model);
  adapters::LoraAdapter& a = trained_like(set, "a", 1);
  save_lora(a, *model, dir.file("a.safetensors"));
  const auto before = read_safetensors(dir.file("a.safetensors")).tensors.size();
  a.modules().begin()->second.down.tensor().fill_(INFINITY);
  EXPECT_THAT(error_of([&] { save_lora(a, *model, dir.file("a.safetensors")); }), HasSubstr("NaN or Inf"));
  EXPECT_EQ(read_safetensors(dir.file("a.safetensors")).tensors.size(), before);
}

}  // namespace
}  // namespace loom::io
