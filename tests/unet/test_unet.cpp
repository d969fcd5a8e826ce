// The UNet (SPEC §8) against diffusers itself: golden forward outputs of three
// tiny configs (tests/unet/fixtures/*, made by make_unet_fixtures.py) in f64
// (≤ 1e-10) and f32 (≤ 1e-4); the sinusoidal embedding against diffusers' own;
// config reading and loading (fp16 names, shards, errors); f64 gradient checks
// of every layer and of a whole tiny UNet (ctest -L unet).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unistd.h>

#include "autograd/gradcheck.h"
#include "autograd/ops.h"
#include "io/tensor_file.h"
#include "unet/ldm_checkpoint.h"
#include "unet/unet_io.h"

#ifndef LOOM_UNET_FIXTURE_DIR
#error "LOOM_UNET_FIXTURE_DIR must name tests/unet/fixtures"
#endif

namespace loom::unet {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
constexpr DType F64 = DType::F64;
constexpr DType F32 = DType::F32;

std::string fixture(const std::string& name) { return std::string(LOOM_UNET_FIXTURE_DIR) + "/" + name; }

UNetLoadOptions in_dtype(DType dtype) {
  UNetLoadOptions o;
  o.dtype = dtype;
  return o;
}

// max |a − b| / max |b|
double rel_error(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.shape(), b.shape());
  const auto x = a.to(F64).to_vector(), y = b.to(F64).to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
    num = std::max(num, std::abs(x[i] - y[i]));
    den = std::max(den, std::abs(y[i]));
  }
  return num / (den > 0 ? den : 1);
}

struct Golden {
  io::TensorFile file;
  Tensor get(const std::string& key, DType dtype) const {
    const Tensor* t = file.find(key);
    return t ? t->to(dtype) : Tensor();
  }
};

Tensor run_golden(const UNet2DConditionModel& model, const Golden& g, DType dtype) {
  NoGradGuard no_grad;
  UNetInputs in;
  in.sample = Variable(g.get("sample", dtype));
  in.timestep = g.get("timestep", F64);
  in.encoder_hidden_states = Variable(g.get("encoder_hidden_states", dtype));
  in.encoder_attention_mask = g.get("encoder_attention_mask", dtype);
  const Tensor te = g.get("text_embeds", dtype);
  if (te.defined()) in.text_embeds = Variable(te);
  in.time_ids = g.get("time_ids", dtype);
  return model.forward(in).tensor();
}

class UNetGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(UNetGolden, MatchesDiffusersInF64) {
  const std::string dir = fixture(GetParam());
  const LoadedUNet u = load_unet_dir(dir, in_dtype(F64));
  const Golden g{io::read_safetensors(dir + "/golden.safetensors")};
  const Tensor out = run_golden(*u.model, g, F64);
  EXPECT_LE(rel_error(out, g.get("output_f64", F64)), 1e-10) << GetParam();
}

TEST_P(UNetGolden, MatchesDiffusersInF32) {
  const std::string dir = fixture(GetParam());
  const LoadedUNet u = load_unet_dir(dir, in_dtype(F32));
  const Golden g{io::read_safetensors(dir + "/golden.safetensors")};
  const Tensor out = run_golden(*u.model, g, F32);
  EXPECT_EQ(out.dtype(), F32);
  EXPECT_LE(rel_error(out, g.get("output_f32", F64)), 1e-4) << GetParam();
}

INSTANTIATE_TEST_SUITE_P(Configs, UNetGolden, ::testing::Values("sd1", "sd2", "sdxl"));

TEST(TimestepEmbedding, MatchesDiffusersSinusoid) {
  const io::TensorFile f = io::read_safetensors(fixture("sinusoid.safetensors"));
  const Tensor t = f.find("timesteps")->to(F64);
  for (int i = 0; i < 3; ++i) {
    const std::string key = "emb_" + std::to_string(i);
    const auto args = f.find(key + "_args")->to_vector();
    const Tensor mine = timestep_embedding(t, int64_t(args[0]), args[1] != 0.0, args[2], F64, Device::cpu());
    // diffusers computes in f32: agreement to f32 rounding of arguments up to 999 rad
    EXPECT_LE(rel_error(mine, *f.find(key)), 2e-5) << key;
  }
}

// ---- config reading -----------------------------------------------------------------------------

TEST(UNetConfig, ReadsAttentionHeadDimAsHeadCountsAndPerBlockLists) {
  const auto c = UNet2DConditionConfig::from_file(fixture("sd2/config.json"));
  EXPECT_EQ(c.num_attention_heads, (std::vector<int64_t>{2, 4}));  // legacy: attention_head_dim holds heads
  EXPECT_TRUE(c.use_linear_projection);
  EXPECT_TRUE(c.upcast_attention);
  EXPECT_EQ(c.transformer_layers_per_block, (std::vector<std::vector<int64_t>>{{1}, {1}}));
  const auto x = UNet2DConditionConfig::from_file(fixture("sdxl/config.json"));
  EXPECT_EQ(x.addition_embed_type, "text_time");
  EXPECT_EQ(x.text_embeds_dim(), 8);
  EXPECT_EQ(x.transformer_layers_per_block, (std::vector<std::vector<int64_t>>{{1}, {1}, {2}}));
  // num_attention_heads, when present, wins over attention_head_dim
  const auto h = UNet2DConditionConfig::from_json_text(
      R"({"block_out_channels":[8,16],"down_block_types":["CrossAttnDownBlock2D","DownBlock2D"],
          "up_block_types":["UpBlock2D","CrossAttnUpBlock2D"],"norm_num_groups":4,
          "attention_head_dim":8,"num_attention_heads":[1,2],"some_new_key":3})");
  EXPECT_EQ(h.num_attention_heads, (std::vector<int64_t>{1, 2}));
  ASSERT_EQ(h.notes.size(), 1u);
  EXPECT_THAT(h.notes[0], HasSubstr("some_new_key"));
}

void expect_config_error(const std::string& extra, const std::string& needle) {
  const std::string text = R"({"block_out_channels":[8,16],"down_block_types":["CrossAttnDownBlock2D","DownBlock2D"],
      "up_block_types":["UpBlock2D","CrossAttnUpBlock2D"],"norm_num_groups":4)" + extra + "}";
  try {
    UNet2DConditionConfig::from_json_text(text, "cfg.json");
    ADD_FAILURE() << "no error for " << extra;
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr(needle)) << extra;
    EXPECT_THAT(e.what(), HasSubstr("cfg.json"));
  }
}

TEST(UNetConfig, UnsupportedValuesAreNamedErrors) {
  expect_config_error(R"(,"class_embed_type":"timestep")", "class_embed_type");
  expect_config_error(R"(,"addition_embed_type":"text")", "addition_embed_type");
  expect_config_error(R"(,"layers_per_block":[1,2,3])", "layers_per_block");
  expect_config_error(R"(,"down_block_types":["AttnDownBlock2D","DownBlock2D"])", "AttnDownBlock2D");
  expect_config_error(R"(,"mid_block_type":"UNetMidBlock2DSimpleCrossAttn")", "mid_block_type");
  expect_config_error(R"(,"transformer_layers_per_block":[[1],[2]])", "reverse_transformer_layers_per_block");
  expect_config_error(R"(,"block_out_channels":[6,16])", "norm_num_groups");
  expect_config_error(R"(,"attention_head_dim":2.5)", "attention_head_dim");
}

// ---- loading -----------------------------------------------------------------------------------

struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& tag) {
    path = fs::temp_directory_path() / ("loom_unet_" + tag + "_" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

TEST(UNetLoad, Fp16NameAndShardedIndexGiveTheSameModel) {
  const std::string src = fixture("sd2");
  const Golden g{io::read_safetensors(src + "/golden.safetensors")};
  const Tensor ref = g.get("output_f64", F64);
  {
    TempDir t("fp16");
    fs::copy_file(src + "/config.json", t.path / "config.json");
    fs::copy_file(src + "/diffusion_pytorch_model.safetensors", t.path / "diffusion_pytorch_model.fp16.safetensors");
    const LoadedUNet u = load_unet_dir(t.path.string(), in_dtype(F64));
    EXPECT_LE(rel_error(run_golden(*u.model, g, F64), ref), 1e-10);
  }
  {
    TempDir t("shards");
    fs::copy_file(src + "/config.json", t.path / "config.json");
    const io::TensorFile all = io::read_safetensors(src + "/diffusion_pytorch_model.safetensors");
    std::vector<std::pair<std::string, Tensor>> a, b;
    nlohmann::json map;
    for (size_t i = 0; i < all.tensors.size(); ++i) {
      const bool first = i % 2 == 0;
      (first ? a : b).push_back(all.tensors[i]);
      map[all.tensors[i].first] = first ? "part-1.safetensors" : "part-2.safetensors";
    }
    io::write_safetensors((t.path / "part-1.safetensors").string(), a);
    io::write_safetensors((t.path / "part-2.safetensors").string(), b);
    std::ofstream((t.path / "diffusion_pytorch_model.safetensors.index.json").string())
        << nlohmann::json{{"metadata", nlohmann::json::object()}, {"weight_map", map}}.dump();
    const LoadedUNet u = load_unet_dir(t.path.string(), in_dtype(F64));
    EXPECT_EQ(u.weight_files.size(), 2u);
    EXPECT_LE(rel_error(run_golden(*u.model, g, F64), ref), 1e-10);
  }
}

TEST(UNetLoad, MissingOrForeignWeightsAreFileErrors) {
  TempDir t("bad");
  fs::copy_file(fixture("sd2/config.json"), t.path / "config.json");
  EXPECT_THROW(load_unet_dir(t.path.string()), io::FileError);  // no weights at all
  const io::TensorFile all = io::read_safetensors(fixture("sd2/diffusion_pytorch_model.safetensors"));
  std::vector<std::pair<std::string, Tensor>> some(all.tensors.begin() + 1, all.tensors.end());
  io::write_safetensors((t.path / "diffusion_pytorch_model.safetensors").string(), some);
  try {
    load_unet_dir(t.path.string());
    ADD_FAILURE() << "a missing key loaded";
  } catch (const io::FileError& e) {
    EXPECT_THAT(e.what(), HasSubstr(all.tensors.front().first));
  }
}

TEST(UNetLoad, SingleFileOriginalCheckpointsGiveDiffusersNumbers) {
  for (const std::string name : {"sd2", "sdxl"}) {
    const std::string dir = fixture(name);
    const LoadedUNet u = load_unet_single_file(dir + "/ldm_unet.safetensors", dir + "/config.json", in_dtype(F64));
    const Golden g{io::read_safetensors(dir + "/golden.safetensors")};
    EXPECT_LE(rel_error(run_golden(*u.model, g, F64), g.get("output_f64", F64)), 1e-10) << name;
    EXPECT_TRUE(std::any_of(u.notes.begin(), u.notes.end(),
                            [](const std::string& n) { return n.find("skipped 1 keys") != std::string::npos; }))
        << name;
  }
  EXPECT_EQ(ldm_names(*load_unet_dir(fixture("sd2"), in_dtype(F64)).model).at("down_blocks.0.resnets.1.conv1.weight"),
            "input_blocks.2.0.in_layers.2.weight");
  // a checkpoint read with the wrong config: an error naming a key, not garbage
  try {
    load_unet_single_file(fixture("sd2/ldm_unet.safetensors"), fixture("sdxl/config.json"));
    ADD_FAILURE() << "loaded with the wrong config";
  } catch (const io::FileError& e) {
    EXPECT_THAT(e.what(), HasSubstr("model.diffusion_model."));
  }
  EXPECT_THROW(load_unet_single_file(fixture("sd2/diffusion_pytorch_model.safetensors"), fixture("sd2/config.json")),
               io::FileError);  // diffusers names: not an original checkpoint
}

// A Linear projection stored as a 1×1 conv (proj_in / proj_out of a checkpoint written with conv
// projections, loaded with use_linear_projection) is reshaped, not refused: the same numbers.
TEST(UNetLoad, SingleFileReshapesOneByOneConvProjections) {
  TempDir t("ldm_conv_proj");
  std::vector<std::pair<std::string, Tensor>> tensors;
  int reshaped = 0;
  for (const auto& [k, v] : io::read_tensor_file(fixture("sd2/ldm_unet.safetensors")).tensors) {
    const bool proj = (k.find(".proj_in.weight") != std::string::npos || k.find(".proj_out.weight") != std::string::npos);
    ASSERT_TRUE(!proj || v.dim() == 2) << k;  // sd2 uses linear projections
    tensors.emplace_back(k, proj ? v.reshape({v.size(0), v.size(1), 1, 1}) : v);
    reshaped += proj;
  }
  EXPECT_GT(reshaped, 0);
  const std::string file = (t.path / "conv_proj.safetensors").string();
  io::write_safetensors(file, tensors);
  const LoadedUNet u = load_unet_single_file(file, fixture("sd2/config.json"), in_dtype(F64));
  const Golden g{io::read_safetensors(fixture("sd2/golden.safetensors"))};
  EXPECT_LE(rel_error(run_golden(*u.model, g, F64), g.get("output_f64", F64)), 1e-10);
}

// ---- f64 gradient checks of the layers ----------------------------------------------------------

void randomize(nn::Module& m, Generator& gen) {
  for (const auto& [name, p] : m.named_parameters())
    p.tensor().copy_(Tensor::randn(p.shape(), gen, F64, Device::cpu(), 0.0, 0.4));
}

Variable leaf(const Shape& s, Generator& gen) { return Variable(Tensor::randn(s, gen, F64), true); }

void expect_gradcheck(const GradcheckFn& fn, const std::vector<Variable>& inputs, const char* what) {
  const GradcheckResult r = gradcheck(fn, inputs);
  EXPECT_TRUE(r.ok) << what << ": " << r.message;
}

TEST(UNetGradcheck, ResnetBlock2DWithShortcutAndScaleShift) {
  Generator gen(11);
  for (const std::string norm : {"default", "scale_shift"}) {
    ResnetBlock2DOptions o;
    o.in_channels = 4, o.out_channels = 6, o.temb_channels = 5, o.groups = 2, o.time_embedding_norm = norm;
    o.output_scale_factor = 1.5;
    ResnetBlock2D block(o, gen, F64);
    randomize(block, gen);
    const Variable x = leaf({2, 4, 3, 5}, gen), temb = leaf({2, 5}, gen);
    expect_gradcheck([&](const std::vector<Variable>& v) { return block.forward(v[0], v[1]); },
                     {x, temb, block.find_parameter("conv1.weight"), block.find_parameter("conv_shortcut.weight"),
                      block.find_parameter("time_emb_proj.weight")},
                     norm.c_str());
  }
}

TEST(UNetGradcheck, DownsampleUpsampleAndTimestepEmbedding) {
  Generator gen(12);
  for (int64_t pad : {1, 0}) {
    Downsample2D down(3, 2, pad, gen, F64);
    randomize(down, gen);
    expect_gradcheck([&](const std::vector<Variable>& v) { return down.forward(v[0]); },
                     {leaf({1, 3, 5, 6}, gen), down.find_parameter("conv.weight"), down.find_parameter("conv.bias")},
                     "Downsample2D");
  }
  Upsample2D up(2, 3, gen, F64);
  randomize(up, gen);
  expect_gradcheck([&](const std::vector<Variable>& v) { return up.forward(v[0]); },
                   {leaf({1, 2, 2, 3}, gen), up.find_parameter("conv.weight")}, "Upsample2D 2x");
  expect_gradcheck([&](const std::vector<Variable>& v) { return up.forward(v[0], 5, 5); },
                   {leaf({1, 2, 2, 3}, gen)}, "Upsample2D to size");
  TimestepEmbedding te({6, 5, 0, "silu"}, gen, F64);
  randomize(te, gen);
  expect_gradcheck([&](const std::vector<Variable>& v) { return te.forward(v[0]); },
                   {leaf({2, 6}, gen), te.find_parameter("linear_1.weight"), te.find_parameter("linear_2.bias")},
                   "TimestepEmbedding");
}

TEST(UNetGradcheck, TinyUNetInF64) {
  auto c = UNet2DConditionConfig::from_json_text(
      R"({"block_out_channels":[4,8],"down_block_types":["CrossAttnDownBlock2D","DownBlock2D"],
          "up_block_types":["UpBlock2D","CrossAttnUpBlock2D"],"norm_num_groups":2,"layers_per_block":1,
          "attention_head_dim":2,"cross_attention_dim":6,"use_linear_projection":true,
          "addition_embed_type":"text_time","addition_time_embed_dim":2,"projection_class_embeddings_input_dim":15})");
  Generator gen(13);
  UNet2DConditionModel model(c, gen, F64);
  randomize(model, gen);
  UNetInputs in;
  in.timestep = Tensor::from_values({37.5}, {1}, F64);
  in.time_ids = Tensor::from_values({8, 6, 0, 0, 8, 6}, {1, 6}, F64);
  const Variable sample = leaf({1, 4, 3, 3}, gen), ctx = leaf({1, 2, 6}, gen), text = leaf({1, 3}, gen);
  expect_gradcheck(
      [&](const std::vector<Variable>& v) {
        UNetInputs x = in;
        x.sample = v[0], x.encoder_hidden_states = v[1], x.text_embeds = v[2];
        return model.forward(x);
      },
      {sample, ctx, text, model.find_parameter("down_blocks.0.resnets.0.conv1.weight"),
       model.find_parameter("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
       model.find_parameter("add_embedding.linear_1.weight")},
      "UNet2DConditionModel (3×3 sample: the upsampler takes the skip's size)");
}

}  // namespace
}  // namespace loom::unet
