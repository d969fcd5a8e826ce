// `loom decode` and `loom encode` end to end (the built executable, as a user runs it):
// decoded PNGs against diffusers' decoder output quantised as VaeImageProcessor does,
// encoded latents against diffusers' posterior mean × scaling_factor, seeded sampling,
// and the refusals (exit codes 2 / 3 / 4 with the file, key or shape named).
#include "tests/cli/cli_fixture.h"

#include "io/png.h"

#ifndef LOOM_VAE_FIXTURE_DIR
#error "LOOM_VAE_FIXTURE_DIR must name tests/vae/fixtures"
#endif

namespace loom {
namespace {

std::string vae_fixture(const std::string& name) { return std::string(LOOM_VAE_FIXTURE_DIR) + "/" + name; }

Tensor golden(const std::string& vae, const std::string& key) {
  const io::TensorFile f = io::read_tensor_file(vae_fixture(vae) + "/golden.safetensors");
  const Tensor* t = f.find(key);
  return t ? *t : Tensor();
}

// Image i of pixels (N, H, W, 3) as a PNG image.
io::RgbImage to_image(const Tensor& pixels, int64_t i) {
  io::RgbImage img;
  img.height = pixels.size(1), img.width = pixels.size(2);
  for (double v : pixels.narrow(0, i, 1).to_vector()) img.rgb.push_back(uint8_t(v));
  return img;
}

io::RgbImage solid(int64_t w, int64_t h, uint8_t value = 100) {
  io::RgbImage img;
  img.width = w, img.height = h;
  img.rgb.assign(size_t(3 * w * h), value);
  return img;
}

class VaeCli : public Cli {
 protected:
  Result decode(const std::string& vae, const std::string& input, const std::string& out,
                std::vector<std::string> extra = {}) const {
    std::vector<std::string> args{"decode", "--vae", vae_fixture(vae), "--input", path(input), "--out", path(out)};
    args.insert(args.end(), extra.begin(), extra.end());
    return loom(args);
  }
  Result encode(const std::string& vae, const std::vector<std::string>& images, const std::string& out,
                std::vector<std::string> extra = {}) const {
    std::vector<std::string> args{"encode", "--vae", vae_fixture(vae), "--images"};
    for (const auto& i : images) args.push_back(path(i));
    args.insert(args.end(), {"--out", path(out)});
    args.insert(args.end(), extra.begin(), extra.end());
    return loom(args);
  }
  Tensor latents_of(const std::string& file) const {
    const io::TensorFile f = io::read_tensor_file(path(file));
    const Tensor* t = f.find("latents");
    return t ? t->to(DType::F64) : Tensor();
  }
};

TEST_F(VaeCli, DecodeWritesDiffusersPixels) {
  for (const std::string vae : {"tiny", "sd_like", "shifted"}) {
    SCOPED_TRACE(vae);
    io::write_safetensors(path(vae + ".safetensors"), {{"latents", golden(vae, "latents").to(DType::F32)}});
    const Result r = decode(vae, vae + ".safetensors", "out_" + vae);
    ASSERT_EQ(r.code, 0) << r;
    const Tensor want = golden(vae, "decoded_pixels");  // (N, H, W, 3)
    const int64_t n = want.size(0);
    int64_t off = 0, total = 0;
    for (int64_t i = 0; i < n; ++i) {
      const std::string png = path("out_" + vae + "/" + vae + "_" + std::to_string(i) + ".png");
      ASSERT_TRUE(exists(png)) << png << "\n" << r;
      EXPECT_THAT(r.out, HasSubstr(png));
      const io::RgbImage img = io::read_png(png);
      ASSERT_EQ(img.height, want.size(1));
      ASSERT_EQ(img.width, want.size(2));
      const std::vector<double> w = want.narrow(0, i, 1).to_vector();
      for (size_t k = 0; k < w.size(); ++k) {
        // f32 against diffusers' f64 output: a value within 1e-4 of a rounding boundary may land one level off
        EXPECT_LE(std::abs(double(img.rgb[k]) - w[k]), 1.0) << "image " << i << " byte " << k;
        off += double(img.rgb[k]) != w[k], ++total;
      }
    }
    EXPECT_LE(off, total / 100) << off << " of " << total << " bytes differ";
  }
}

TEST_F(VaeCli, EncodeOfPngsIsDiffusersPosteriorMeanTimesScalingFactor) {
  for (const std::string vae : {"tiny", "sd_like", "shifted"}) {
    SCOPED_TRACE(vae);
    const Tensor pixels = golden(vae, "pixels");
    fs::create_directories(path("in_" + vae));
    std::vector<std::string> files;
    for (int64_t i = 0; i < pixels.size(0); ++i) {
      files.push_back("in_" + vae + "/img" + std::to_string(i) + ".png");
      io::write_png(path(files.back()), to_image(pixels, i));
    }
    const Result r = encode(vae, files, vae + ".safetensors");
    ASSERT_EQ(r.code, 0) << r;
    EXPECT_LE(rel_error(latents_of(vae + ".safetensors"), golden(vae, "encoded_latents")), 1e-4);
    // a directory: its .png files in name order
    const Result d = encode(vae, {"in_" + vae}, vae + "_dir.safetensors");
    ASSERT_EQ(d.code, 0) << d;
    EXPECT_LE(rel_error(latents_of(vae + "_dir.safetensors"), golden(vae, "encoded_latents")), 1e-4);
  }
}

TEST_F(VaeCli, DecodeThenEncodeRoundTripsTheFileFormats) {
  io::write_safetensors(path("lat.safetensors"), {{"latents", golden("tiny", "latents").to(DType::F32)}});
  ASSERT_EQ(decode("tiny", "lat.safetensors", "imgs").code, 0);
  const Result r = encode("tiny", {"imgs"}, "back.h5");
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_EQ(latents_of("back.h5").shape(), (Shape{2, 4, 8, 8}));
}

// bf16 on the CPU (no bf16 convolutions there) and a force_upcast VAE run in f32: the same pixels.
TEST_F(VaeCli, LowPrecisionRunsTheVaeInF32WhereItMust) {
  io::write_safetensors(path("lat.safetensors"), {{"latents", golden("tiny", "latents").to(DType::F32)}});
  ASSERT_EQ(decode("tiny", "lat.safetensors", "f32").code, 0);
  const Result r = decode("tiny", "lat.safetensors", "bf16", {"--device", "cpu", "--precision", "bf16"});
  ASSERT_EQ(r.code, 0) << r;
  EXPECT_THAT(r.err, HasSubstr("force_upcast: the VAE runs in f32"));
  EXPECT_EQ(read_bytes(path("bf16/lat_0.png")), read_bytes(path("f32/lat_0.png")));
}

TEST_F(VaeCli, SampleIsSeededAndNotTheMean) {
  io::write_png(path("a.png"), to_image(golden("tiny", "pixels"), 0));
  ASSERT_EQ(encode("tiny", {"a.png"}, "mean.safetensors").code, 0);
  ASSERT_EQ(encode("tiny", {"a.png"}, "s3.safetensors", {"--sample", "--seed", "3"}).code, 0);
  ASSERT_EQ(encode("tiny", {"a.png"}, "s3b.safetensors", {"--sample", "--seed", "3"}).code, 0);
  ASSERT_EQ(encode("tiny", {"a.png"}, "s4.safetensors", {"--sample", "--seed", "4"}).code, 0);
  const Tensor mean = latents_of("mean.safetensors"), s3 = latents_of("s3.safetensors");
  EXPECT_EQ(s3.to_vector(), latents_of("s3b.safetensors").to_vector());
  EXPECT_GT(rel_error(s3, mean), 1e-3);
  EXPECT_GT(rel_error(latents_of("s4.safetensors"), s3), 1e-3);
  const Result r = encode("tiny", {"a.png"}, "x.safetensors", {"--seed", "3"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--sample"));
}

TEST_F(VaeCli, DecodeRefusesBadLatentsNamingFileKeyAndShape) {
  io::write_safetensors(path("other.safetensors"), {{"sample", Tensor::zeros({1, 4, 2, 2})}});
  Result r = decode("tiny", "other.safetensors", "o");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("other.safetensors"), HasSubstr("'latents'"), HasSubstr("sample")));
  r = decode("tiny", "other.safetensors", "o", {"--key", "sample"});
  EXPECT_EQ(r.code, 0) << r;
  io::write_safetensors(path("three.safetensors"), {{"latents", Tensor::zeros({2, 3, 8, 8})}});
  r = decode("tiny", "three.safetensors", "o");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("three.safetensors"), HasSubstr("2, 3, 8, 8"), HasSubstr("latent_channels 4")));
  io::write_safetensors(path("nan.safetensors"), {{"latents", Tensor::full({1, 4, 2, 2}, NAN)}});
  r = decode("tiny", "nan.safetensors", "o");
  EXPECT_EQ(r.code, 4) << r;
  EXPECT_THAT(r.err, HasSubstr("not finite"));
  r = decode("tiny", "missing.safetensors", "o");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, HasSubstr("missing.safetensors"));
}

TEST_F(VaeCli, EncodeRefusesBadImagesNamingFileAndSize) {
  write_bytes(path("bad.png"), "not a png at all");
  Result r = encode("tiny", {"bad.png"}, "o.safetensors");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, HasSubstr("bad.png"));
  // sd_like downsamples by 8: a 20x16 image is refused, or centre-cropped to 16x16 on request
  io::write_png(path("odd.png"), solid(20, 16));
  r = encode("sd_like", {"odd.png"}, "o.safetensors");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("odd.png"), HasSubstr("20x16"), HasSubstr("multiples of 8"), HasSubstr("--center-crop")));
  EXPECT_FALSE(exists(path("o.safetensors")));
  r = encode("sd_like", {"odd.png"}, "o.safetensors", {"--center-crop"});
  EXPECT_EQ(r.code, 0) << r;
  EXPECT_EQ(latents_of("o.safetensors").shape(), (Shape{1, 4, 2, 2}));
  io::write_png(path("a.png"), solid(16, 16)), io::write_png(path("b.png"), solid(16, 8));
  r = encode("tiny", {"a.png", "b.png"}, "ab.safetensors");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("b.png"), HasSubstr("16x8"), HasSubstr("a.png"), HasSubstr("16x16")));
  fs::create_directories(path("empty"));
  r = encode("tiny", {"empty"}, "e.safetensors");
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, HasSubstr("empty"));
}

TEST_F(VaeCli, BadVaeDirectoryAndUsage) {
  fs::create_directories(path("vae"));
  write_bytes(path("vae/config.json"), R"({"_class_name": "AutoencoderKL", "down_block_types": ["AttnDownEncoderBlock2D"]})");
  io::write_safetensors(path("lat.safetensors"), {{"latents", Tensor::zeros({1, 4, 2, 2})}});
  Result r = loom({"decode", "--vae", path("vae"), "--input", path("lat.safetensors"), "--out", path("o")});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("config.json"), HasSubstr("down_block_types"), HasSubstr("AttnDownEncoderBlock2D")));
  r = loom({"decode", "--vae", path("nowhere"), "--input", path("lat.safetensors"), "--out", path("o")});
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, HasSubstr("nowhere"));
  r = loom({"decode", "--input", path("lat.safetensors"), "--out", path("o")});
  EXPECT_EQ(r.code, 2) << r;
  r = decode("tiny", "lat.safetensors", "o", {"--device", "tpu"});
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("tpu"));
}

}  // namespace
}  // namespace loom
