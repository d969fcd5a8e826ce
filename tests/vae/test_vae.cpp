// The VAE (diffusers' AutoencoderKL, SPEC §8) against diffusers itself: encoder
// moments / posterior mean and logvar and decoder outputs of three tiny configs
// (tests/vae/fixtures/*, made by make_vae_fixtures.py) in f64 (≤ 1e-10) and f32
// (≤ 1e-4); the latent scaling; deprecated attention key names; config errors
// naming the key; PNG reading and writing; image conversions; an f64 gradient
// check of a tiny decoder (ctest -L unet).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <png.h>

#include <filesystem>
#include <limits>

#include "attention/sdpa.h"
#include "autograd/gradcheck.h"
#include "io/png.h"
#include "io/tensor_file.h"
#include "tensor/ops.h"
#include "tests/test_helpers.h"
#include "unet/vae.h"
#include "unet/vae_image.h"

#ifndef LOOM_VAE_FIXTURE_DIR
#error "LOOM_VAE_FIXTURE_DIR must name tests/vae/fixtures"
#endif

namespace loom::unet {
namespace {

namespace fs = std::filesystem;
using loom::testing::error_of;
using loom::testing::rel_error;
using loom::testing::TempDir;
using ::testing::AllOf;
using ::testing::HasSubstr;
constexpr DType F64 = DType::F64;
constexpr DType F32 = DType::F32;

std::string fixture(const std::string& name) { return std::string(LOOM_VAE_FIXTURE_DIR) + "/" + name; }

struct Golden {
  io::TensorFile file;
  explicit Golden(const std::string& name) : file(io::read_tensor_file(fixture(name) + "/golden.safetensors")) {}
  Tensor get(const std::string& key, DType dtype = F64) const {
    const Tensor* t = file.find(key);
    EXPECT_TRUE(t) << "golden tensor " << key;
    return t ? t->to(dtype) : Tensor();
  }
};

LoadedVae load(const std::string& name, DType dtype) {
  VaeLoadOptions o;
  o.dtype = dtype;
  return load_vae_dir(fixture(name), o);
}

class VaeGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(VaeGolden, EncoderAndDecoderMatchDiffusersInF64) {
  const LoadedVae vae = load(GetParam(), F64);
  const Golden g(GetParam());
  NoGradGuard no_grad;
  const Tensor moments = vae.model->encode(Variable(g.get("image"))).tensor();
  EXPECT_LE(rel_error(moments, g.get("moments_f64")), 1e-10);
  const LatentPosterior post = latent_posterior(moments);
  EXPECT_LE(rel_error(post.mean, g.get("mean_f64")), 1e-10);
  EXPECT_LE(rel_error(post.logvar, g.get("logvar_f64")), 1e-10);
  const Tensor decoded = vae.model->decode(Variable(g.get("z"))).tensor();
  EXPECT_LE(rel_error(decoded, g.get("decoded_f64")), 1e-10);
}

TEST_P(VaeGolden, EncoderAndDecoderMatchDiffusersInF32) {
  const LoadedVae vae = load(GetParam(), F32);
  const Golden g(GetParam());
  NoGradGuard no_grad;
  const Tensor moments = vae.model->encode(Variable(g.get("image", F32))).tensor();
  EXPECT_EQ(moments.dtype(), F32);
  EXPECT_LE(rel_error(moments.to(F64), g.get("moments_f32")), 1e-4);
  EXPECT_LE(rel_error(vae.model->decode(Variable(g.get("z", F32))).tensor().to(F64), g.get("decoded_f32")), 1e-4);
}

// DiagonalGaussianDistribution: std = exp(logvar / 2); a sample is mean + std · N(0, 1) drawn
// from loom's generator (so seeded, but not torch's numbers).
TEST_P(VaeGolden, PosteriorSampleIsMeanPlusStdTimesNoise) {
  const Golden g(GetParam());
  const LatentPosterior post = latent_posterior(g.get("moments_f64"));
  const std::vector<double> logvar = g.get("logvar_f64").to_vector(), std = post.std().to_vector();
  for (size_t i = 0; i < logvar.size(); ++i) ASSERT_NEAR(std[i], std::exp(0.5 * logvar[i]), 1e-15 * std[i]);
  Generator a(9), b(9);
  const Tensor noise = Tensor::randn(post.mean.shape(), b, F64);
  const std::vector<double> s = post.sample(a).to_vector(), m = post.mean.to_vector(), n = noise.to_vector();
  for (size_t i = 0; i < s.size(); ++i) ASSERT_NEAR(s[i], m[i] + std[i] * n[i], 1e-14);
  // logvar is clamped to [−30, 20]
  const LatentPosterior clamped = latent_posterior(Tensor::from_values({1, 2, 50, -50}, {1, 4, 1, 1}, F64));
  EXPECT_EQ(clamped.mean.to_vector(), (std::vector<double>{1, 2}));
  EXPECT_EQ(clamped.logvar.to_vector(), (std::vector<double>{20, -30}));
}

TEST_P(VaeGolden, LatentScalingIsDiffusers) {
  const LoadedVae vae = load(GetParam(), F64);
  const Golden g(GetParam());
  EXPECT_LE(rel_error(scale_latents(g.get("z"), vae.model->config()), g.get("latents")), 1e-15);
  EXPECT_LE(rel_error(unscale_latents(g.get("latents"), vae.model->config()), g.get("z")), 1e-14);
  EXPECT_LE(rel_error(scale_latents(g.get("mean_f64"), vae.model->config()), g.get("encoded_latents")), 1e-15);
}

TEST_P(VaeGolden, DecodedPixelsAreDiffusersPostprocess) {
  const Golden g(GetParam());
  const Tensor decoded = g.get("decoded_f64"), pixels = g.get("decoded_pixels");
  for (int64_t i = 0; i < decoded.size(0); ++i) {
    const io::RgbImage img = tensor_to_image(decoded.narrow(0, i, 1).reshape({3, decoded.size(2), decoded.size(3)}));
    ASSERT_EQ(img.height, pixels.size(1));
    ASSERT_EQ(img.width, pixels.size(2));
    const std::vector<double> want = pixels.narrow(0, i, 1).to_vector();
    for (size_t k = 0; k < want.size(); ++k) ASSERT_EQ(double(img.rgb[k]), want[k]) << "image " << i << " byte " << k;
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, VaeGolden, ::testing::Values("tiny", "sd_like", "shifted"));

TEST(VaeModel, ParameterNamesAreDiffusers) {
  const LoadedVae vae = load("tiny", F64);
  const auto sd = vae.model->state_dict();
  for (const char* key : {"encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.norm1.weight",
                          "encoder.down_blocks.0.downsamplers.0.conv.weight", "encoder.mid_block.attentions.0.group_norm.bias",
                          "encoder.mid_block.attentions.0.to_q.bias", "encoder.mid_block.attentions.0.to_out.0.weight",
                          "encoder.mid_block.resnets.1.conv2.weight", "encoder.conv_norm_out.weight", "quant_conv.weight",
                          "post_quant_conv.bias", "decoder.up_blocks.0.resnets.1.conv1.weight",
                          "decoder.up_blocks.0.upsamplers.0.conv.weight", "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"})
    EXPECT_TRUE(sd.count(key)) << key;
  EXPECT_FALSE(sd.count("decoder.up_blocks.1.upsamplers.0.conv.weight"));
  EXPECT_FALSE(sd.count("decoder.up_blocks.0.resnets.2.conv1.weight"));  // layers_per_block 1: two resnets
  EXPECT_FALSE(sd.count("encoder.down_blocks.0.resnets.1.conv1.weight"));  // one resnet
  const LoadedVae shifted = load("shifted", F64);
  EXPECT_FALSE(shifted.model->find_module("quant_conv"));
  EXPECT_FALSE(shifted.model->find_module("encoder.mid_block.attentions"));
  EXPECT_EQ(shifted.model->config().downsampling_factor(), 2);
  EXPECT_EQ(load("sd_like", F64).model->config().downsampling_factor(), 8);
}

// Old VAE files name the mid-block attention query / key / value / proj_attn.
TEST(VaeModel, LoadsDeprecatedAttentionNames) {
  TempDir dir;
  fs::copy_file(fixture("tiny") + "/config.json", dir / "config.json");
  io::TensorFile f = io::read_tensor_file(fixture("tiny") + "/diffusion_pytorch_model.safetensors");
  int renamed = 0;
  for (auto& [name, t] : f.tensors)
    for (const auto& [now, old] : {std::pair<std::string, std::string>{".to_q.", ".query."}, {".to_k.", ".key."},
                                   {".to_v.", ".value."}, {".to_out.0.", ".proj_attn."}})
      if (const size_t at = name.find(now); at != std::string::npos && name.find("mid_block.attentions.0") != std::string::npos) {
        name.replace(at, now.size(), old);
        ++renamed;
      }
  EXPECT_EQ(renamed, 16);  // encoder and decoder: 4 projections × weight and bias
  io::write_safetensors(dir / "diffusion_pytorch_model.safetensors", f.tensors);
  VaeLoadOptions o;
  o.dtype = F64;
  const LoadedVae old = load_vae_dir(dir.path(), o);
  EXPECT_THAT(old.notes.back(), AllOf(HasSubstr("16 keys"), HasSubstr("query/key/value/proj_attn")));
  const Golden g("tiny");
  NoGradGuard no_grad;
  EXPECT_LE(rel_error(old.model->decode(Variable(g.get("z"))).tensor(), g.get("decoded_f64")), 1e-10);
}

// Weights are found as for the UNet: the .fp16 file name (first with variant fp16, as a fallback without).
TEST(VaeModel, FindsTheFp16VariantFile) {
  TempDir dir;
  fs::copy_file(fixture("tiny") + "/config.json", dir / "config.json");
  fs::copy_file(fixture("tiny") + "/diffusion_pytorch_model.safetensors", dir / "diffusion_pytorch_model.fp16.safetensors");
  EXPECT_TRUE(is_vae_dir(dir.path()));
  EXPECT_FALSE(is_vae_dir(dir / "nowhere"));
  const Golden g("tiny");
  for (const std::string variant : {"fp16", ""}) {
    VaeLoadOptions o;
    o.dtype = F64, o.variant = variant;
    const LoadedVae vae = load_vae_dir(dir.path(), o);
    EXPECT_THAT(vae.weight_files.at(0), HasSubstr("diffusion_pytorch_model.fp16.safetensors"));
    NoGradGuard no_grad;
    EXPECT_LE(rel_error(vae.model->decode(Variable(g.get("z"))).tensor(), g.get("decoded_f64")), 1e-10);
  }
}

TEST(VaeModel, StrictLoadNamesTheKey) {
  TempDir dir;
  fs::copy_file(fixture("tiny") + "/config.json", dir / "config.json");
  io::TensorFile f = io::read_tensor_file(fixture("tiny") + "/diffusion_pytorch_model.safetensors");
  std::vector<std::pair<std::string, Tensor>> kept;
  for (const auto& [name, t] : f.tensors)
    if (name != "decoder.conv_out.bias") kept.emplace_back(name, t);
  io::write_safetensors(dir / "diffusion_pytorch_model.safetensors", kept);
  EXPECT_THAT(error_of([&] { load_vae_dir(dir.path()); }), HasSubstr("decoder.conv_out.bias"));
  fs::remove(dir / "diffusion_pytorch_model.safetensors");
  EXPECT_THAT(error_of([&] { load_vae_dir(dir.path()); }),
              AllOf(HasSubstr("no VAE weights found"), HasSubstr("diffusion_pytorch_model.safetensors")));
}

// The VAE reads its files with io::read_weight_file, as the UNet does: a NaN weight is an error
// naming the file and the key.
TEST(VaeModel, NonFiniteWeightNamesTheFileAndKey) {
  TempDir dir;
  fs::copy_file(fixture("tiny") + "/config.json", dir / "config.json");
  io::TensorFile f = io::read_tensor_file(fixture("tiny") + "/diffusion_pytorch_model.safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const auto& [name, t] : f.tensors) {
    Tensor v = t.to(DType::F64).contiguous();
    if (name == "decoder.conv_out.bias") v.data<double>()[0] = std::numeric_limits<double>::infinity();
    tensors.emplace_back(name, v.to(t.dtype()));
  }
  io::write_safetensors(dir / "diffusion_pytorch_model.safetensors", tensors);
  EXPECT_THAT(error_of([&] { load_vae_dir(dir.path()); }),
              AllOf(HasSubstr("diffusion_pytorch_model.safetensors"), HasSubstr("'decoder.conv_out.bias'"),
                    HasSubstr("NaN or Inf")));
}

TEST(VaeConfig, DefaultsAndErrorsNameTheKey) {
  const AutoencoderKLConfig d = AutoencoderKLConfig::from_json_text("{}");
  EXPECT_EQ(d.block_out_channels, std::vector<int64_t>{64});
  EXPECT_DOUBLE_EQ(d.scaling_factor, 0.18215);
  EXPECT_FALSE(d.has_shift_factor);
  EXPECT_TRUE(d.force_upcast && d.use_quant_conv && d.use_post_quant_conv && d.mid_block_add_attention);
  auto err = [](const std::string& json) { return error_of([&] { AutoencoderKLConfig::from_json_text(json); }); };
  EXPECT_THAT(err(R"({"down_block_types": ["AttnDownEncoderBlock2D"]})"),
              AllOf(HasSubstr("down_block_types"), HasSubstr("AttnDownEncoderBlock2D")));
  EXPECT_THAT(err(R"({"up_block_types": ["AttnUpDecoderBlock2D"]})"), HasSubstr("up_block_types"));
  EXPECT_THAT(err(R"({"block_out_channels": [64, 128]})"), HasSubstr("down_block_types"));
  EXPECT_THAT(err(R"({"latents_mean": [0.1, 0.2, 0.3, 0.4]})"), HasSubstr("latents_mean"));
  EXPECT_THAT(err(R"({"norm_num_groups": 5})"), HasSubstr("norm_num_groups"));
  EXPECT_THAT(err(R"({"act_fn": "tanhshrink"})"), HasSubstr("act_fn"));
  EXPECT_THAT(err(R"({"scaling_factor": 0})"), HasSubstr("scaling_factor"));
  EXPECT_THAT(err(R"({"use_quant_conv": 1})"), HasSubstr("use_quant_conv"));
  EXPECT_THAT(err(R"({"_class_name": "AutoencoderTiny"})"), HasSubstr("AutoencoderTiny"));
  const AutoencoderKLConfig s = AutoencoderKLConfig::from_json_text(R"({"shift_factor": null, "frobnicate": 1})");
  EXPECT_FALSE(s.has_shift_factor);
  EXPECT_THAT(s.notes.at(0), HasSubstr("frobnicate"));
}

// Stable Diffusion's VAE attends over h·w tokens with one head of 512 channels: on the CPU the
// default backend is flash there (nothing of size (h·w)²), with the math backend's numbers.
TEST(VaeModel, MidBlockAttentionAt512ChannelsIsFlashOnTheCpu) {
  Generator gen(5);
  const Tensor q = Tensor::randn({1, 30, 512}, gen, F64);
  EXPECT_EQ(attention::auto_backend(q, q, q, Tensor(), 1), attention::BackendKind::Flash);
  AutoencoderKLConfig c;
  c.block_out_channels = {512};
  VaeMidBlock mid(512, c, gen, F64, Device::cpu());
  const Variable x(Tensor::randn({1, 512, 5, 6}, gen, F64));
  NoGradGuard no_grad;
  Tensor flash, math;
  {
    attention::ScopedAttentionBackend b(attention::BackendKind::Flash);
    flash = mid.forward(x).tensor();
  }
  {
    attention::ScopedAttentionBackend b(attention::BackendKind::Math);
    math = mid.forward(x).tensor();
  }
  EXPECT_LE(rel_error(flash, math), 1e-12);
}

// ---- images --------------------------------------------------------------------------------------

TEST(VaePng, RoundTripsAndRefusesBadFiles) {
  TempDir dir;
  io::RgbImage img;
  img.width = 5, img.height = 3;
  for (int i = 0; i < 45; ++i) img.rgb.push_back(uint8_t(i * 5 + 7));
  io::write_png(dir / "a.png", img);
  const io::RgbImage back = io::read_png(dir / "a.png");
  EXPECT_EQ(back.width, 5);
  EXPECT_EQ(back.height, 3);
  EXPECT_EQ(back.rgb, img.rgb);
  loom::testing::write_bytes(dir / "bad.png", "this is not a png");
  EXPECT_THAT(error_of([&] { io::read_png(dir / "bad.png"); }), AllOf(HasSubstr("bad.png"), HasSubstr("not a PNG")));
  const std::string bytes = loom::testing::read_bytes(dir / "a.png");
  loom::testing::write_bytes(dir / "cut.png", bytes.substr(0, bytes.size() / 2));
  EXPECT_THAT(error_of([&] { io::read_png(dir / "cut.png"); }), HasSubstr("cut.png"));
  EXPECT_THAT(error_of([&] { io::read_png(dir / "missing.png"); }), HasSubstr("missing.png"));
}

TEST(VaeImages, ConversionsAreVaeImageProcessor) {
  io::RgbImage img;
  img.width = 2, img.height = 1;
  img.rgb = {0, 128, 255, 1, 2, 3};
  const Tensor x = images_to_tensor({img}, F64);
  ASSERT_EQ(x.shape(), (Shape{1, 3, 1, 2}));
  EXPECT_DOUBLE_EQ(x.to_vector()[0], -1.0);                                   // r of pixel 0
  EXPECT_DOUBLE_EQ(x.to_vector()[2], double(2.0f * (128.0f / 255.0f) - 1.0f));  // g of pixel 0
  EXPECT_DOUBLE_EQ(x.to_vector()[4], 1.0);                                    // b of pixel 0
  // round(255 · clamp(x/2 + 0.5)): beyond [−1, 1] clamps; [3, H, W] becomes interleaved RGB
  const Tensor y = Tensor::from_values({-3.0, 3.0, 0.0, 0.9 / 255 - 1, 2.0, 6.2 / 255 - 1}, {3, 1, 2}, F64);
  const io::RgbImage out = tensor_to_image(y);
  EXPECT_EQ(out.rgb, (std::vector<uint8_t>{0, 128, 255, 255, 0, 3}));
  io::RgbImage wide;
  wide.width = 7, wide.height = 5;
  for (int i = 0; i < 7 * 5; ++i) wide.rgb.insert(wide.rgb.end(), {uint8_t(i), uint8_t(i), uint8_t(i)});
  const io::RgbImage c = center_crop(wide, 2);  // 6x4, left 0, top 0
  EXPECT_EQ(c.width, 6);
  EXPECT_EQ(c.height, 4);
  EXPECT_EQ(c.rgb[0], 0);
  EXPECT_EQ(c.rgb[3 * 6], 7);  // row 1
  const io::RgbImage c4 = center_crop(wide, 4);  // 4x4: left (7−4)/2 = 1, top 0
  EXPECT_EQ(c4.rgb[0], 1);
}

// PNG bytes of `pixels` in libpng's `format` (grey + alpha, 16-bit, ...).
std::string png_of(const std::vector<uint16_t>& pixels, uint32_t width, uint32_t height, uint32_t format) {
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = width, image.height = height, image.format = format;
  std::vector<uint8_t> bytes8(pixels.begin(), pixels.end());
  const void* data = (format & PNG_FORMAT_FLAG_LINEAR) ? static_cast<const void*>(pixels.data()) : bytes8.data();
  png_alloc_size_t size = 0;
  EXPECT_TRUE(png_image_write_get_memory_size(image, size, 0, data, 0, nullptr));
  std::string out(size, '\0');
  EXPECT_TRUE(png_image_write_to_memory(&image, out.data(), &size, 0, data, 0, nullptr));
  out.resize(size);
  return out;
}

// As PIL's convert("RGB"): grey is replicated, alpha is dropped (not composited), a gAMA chunk
// changes nothing; 16-bit is refused.
TEST(VaePng, ColourTypesBecomeRgbAsPil) {
  const io::RgbImage ga = io::decode_png(png_of({10, 0, 200, 255}, 2, 1, PNG_FORMAT_GA), "ga.png");
  EXPECT_EQ(ga.rgb, (std::vector<uint8_t>{10, 10, 10, 200, 200, 200}));
  const io::RgbImage rgba = io::decode_png(png_of({1, 2, 3, 0, 4, 5, 6, 128}, 2, 1, PNG_FORMAT_RGBA), "rgba.png");
  EXPECT_EQ(rgba.rgb, (std::vector<uint8_t>{1, 2, 3, 4, 5, 6}));
  // a 1x1 RGB PNG (100, 150, 200) with gAMA 1.0 (libpng's simplified reader would give 167, 200, 228)
  const std::string gamma = loom::testing::read_bytes(fixture("gamma.png"));
  ASSERT_FALSE(gamma.empty());
  EXPECT_EQ(io::decode_png(gamma, "gamma.png").rgb, (std::vector<uint8_t>{100, 150, 200}));
  EXPECT_THAT(error_of([] { io::decode_png(png_of({1000, 2000, 3000}, 1, 1, PNG_FORMAT_LINEAR_RGB), "deep.png"); }),
              AllOf(HasSubstr("deep.png"), HasSubstr("16-bit")));
}

// ---- gradients -----------------------------------------------------------------------------------

TEST(VaeGradcheck, TinyDecoderAndEncoderInF64) {
  const AutoencoderKLConfig c = AutoencoderKLConfig::from_json_text(
      R"({"block_out_channels": [4, 4], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
          "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "norm_num_groups": 2, "latent_channels": 2})");
  Generator gen(21);
  AutoencoderKL vae(c, gen, F64);
  for (auto& [name, p] : vae.named_parameters()) {
    Tensor t = p.tensor();
    t.copy_(ops::add_scalar(ops::mul_scalar(Tensor::randn(t.shape(), gen, F64), 0.3), name.find("norm") != std::string::npos ? 1.0 : 0.0));
  }
  const Variable z(Tensor::randn({1, 2, 2, 3}, gen, F64), true);
  GradcheckResult r = gradcheck([&](const std::vector<Variable>& v) { return vae.decode(v[0]); },
                                {z, vae.find_parameter("decoder.mid_block.attentions.0.to_q.weight"),
                                 vae.find_parameter("post_quant_conv.bias")});
  EXPECT_TRUE(r.ok) << "decoder: " << r.message;
  const Variable x(Tensor::randn({1, 3, 4, 2}, gen, F64), true);
  r = gradcheck([&](const std::vector<Variable>& v) { return vae.encode(v[0]); },
                {x, vae.find_parameter("encoder.mid_block.attentions.0.group_norm.weight")});
  EXPECT_TRUE(r.ok) << "encoder: " << r.message;
}

}  // namespace
}  // namespace loom::unet
