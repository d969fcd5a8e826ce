// `loom decode` / `loom encode`: see loom_vae.h.
#include "loom_vae.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/png.h"
#include "io/tensor_file.h"
#include "tensor/ops.h"
#include "tensor/precision.h"
#include "trainer/trainer.h"
#include "unet/vae.h"
#include "unet/vae_image.h"

namespace loom::cli {

namespace fs = std::filesystem;

namespace {

void add_common_flags(CLI::App* cmd, VaeArgs& a) {
  cmd->add_option("--vae", a.vae, "diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors)")
      ->required();
  cmd->add_option("--variant", a.variant, "Weights variant: fp16 (diffusion_pytorch_model.fp16.safetensors first)");
  a.device = "auto";
  cmd->add_option("--device", a.device, "cpu | cuda | cuda:N | auto")->capture_default_str();
  cmd->add_option("--precision", a.precision,
                  "f32 | tf32 | bf16 | f16 (bf16/f16 run the VAE in f32 when its config says force_upcast, and on the CPU)");
}

// The device and the dtype the VAE computes in (f32 for bf16/f16 when force_upcast), said on stderr.
struct VaePlacement {
  Device device;
  DType dtype;
};

VaePlacement place(const VaeArgs& a, bool force_upcast) {
  trainer::Placement p;
  try {
    p = trainer::placement_of(a.device, a.precision);
    if (!a.variant.empty() && a.variant != "fp16") throw Error("--variant must be fp16, got " + a.variant);
  } catch (const Error& e) {
    throw trainer::OptionError(e.what());
  }
  std::cerr << "loom: " << p.describe() << "\n";
  DType dtype = storage_dtype(p.precision);
  if (dtype != DType::F32 && force_upcast) {
    std::cerr << "loom: the VAE config says force_upcast: the VAE runs in f32\n";
    dtype = DType::F32;
  } else if (dtype != DType::F32 && p.device.is_cpu()) {
    std::cerr << "loom: the CPU convolutions are f32/f64 only: the VAE runs in f32\n";
    dtype = DType::F32;
  }
  set_allow_tf32(p.precision == Precision::TF32);
  return {p.device, dtype};
}

unet::LoadedVae load(const VaeArgs& a, const VaePlacement& where) {
  unet::VaeLoadOptions o;
  o.dtype = where.dtype, o.device = where.device, o.variant = a.variant;
  unet::LoadedVae vae = unet::load_vae_dir(a.vae, o);
  for (const std::string& note : vae.notes) std::cerr << "loom: note: " << note << "\n";
  return vae;
}

bool force_upcast_of(const std::string& dir) {
  const std::string config = dir + "/config.json";
  if (!fs::is_regular_file(config)) throw io::FileError(config, "missing (a VAE directory holds diffusers' config.json)");
  try {
    return unet::AutoencoderKLConfig::from_file(config).force_upcast;
  } catch (const Error& e) {
    throw io::FileError(config, e.what());
  }
}

// ---- decode ------------------------------------------------------------------------------------

// The latents tensor of the input file, checked against the VAE: [N, latent_channels, h, w].
Tensor read_latents(const VaeArgs& a, const unet::AutoencoderKLConfig& c) {
  const io::TensorFile f = io::read_tensor_file(a.input);
  const Tensor* t = f.find(a.key);
  if (!t) {
    std::string held;
    for (const auto& [name, unused] : f.tensors) held += (held.empty() ? "" : ", ") + name;
    throw io::FileError(a.input, "no tensor '" + a.key + "' (it holds: " + (held.empty() ? "nothing" : held) +
                                     "; choose another with --key)");
  }
  if (t->dim() != 4 || t->size(1) != c.latent_channels || t->numel() == 0) {
    std::ostringstream os;
    os << "'" << a.key << "' has shape " << t->shape() << ", but the VAE " << a.vae << " decodes [N, "
       << c.latent_channels << ", h, w] (latent_channels " << c.latent_channels << ")";
    throw io::FileError(a.input, os.str());
  }
  return *t;
}

// "<stem>_<i>.png", i zero-padded to the width of the last index.
std::string image_name(const std::string& input, int64_t i, int64_t n) {
  std::string index = std::to_string(i);
  const size_t width = std::to_string(std::max<int64_t>(n - 1, 0)).size();
  index.insert(0, width - std::min(width, index.size()), '0');
  return fs::path(input).stem().string() + "_" + index + ".png";
}

int run_decode(const VaeArgs& a) {
  const VaePlacement where = place(a, force_upcast_of(a.vae));
  const unet::LoadedVae vae = load(a, where);
  const auto& c = vae.model->config();
  if (c.out_channels != 3)
    throw io::FileError(a.vae + "/config.json", "out_channels is " + std::to_string(c.out_channels) +
                                                  ": decode writes RGB images (out_channels 3)");
  const Tensor latents = read_latents(a, c);
  trainer::make_dirs(a.out_dir);
  NoGradGuard no_grad;
  const int64_t n = latents.size(0);
  for (int64_t i = 0; i < n; ++i) {  // one image at a time: the peak memory of one decode
    const Tensor z = unet::unscale_latents(latents.narrow(0, i, 1).to(DType::F64), c).to(where.dtype).to(where.device);
    const Tensor image = vae.model->decode(Variable(z)).tensor();  // [1, 3, H, W]
    if (!io::all_finite(image))
      throw trainer::NumericalError("decode: the decoded image " + std::to_string(i) + " of " + a.input +
                                    " is not finite (non-finite latents, or a VAE that overflows in this precision)");
    const std::string path = (fs::path(a.out_dir) / image_name(a.input, i, n)).string();
    io::write_png(path, unet::tensor_to_image(image.narrow(0, 0, 1).reshape({3, image.size(2), image.size(3)})));
    std::cout << "wrote " << path << " (" << image.size(3) << "x" << image.size(2) << ", latents " << i << ")\n";
  }
  return 0;
}

// ---- encode ------------------------------------------------------------------------------------

bool is_png_name(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char ch) { return char(std::tolower(ch)); });
  return ext == ".png";
}

// Files named on the command line, and the .png files of named directories (sorted by name).
std::vector<std::string> image_files(const std::vector<std::string>& args) {
  std::vector<std::string> files;
  for (const std::string& arg : args) {
    if (!fs::is_directory(arg)) {
      files.push_back(arg);
      continue;
    }
    std::vector<std::string> in_dir;
    for (const auto& e : fs::directory_iterator(arg))
      if (e.is_regular_file() && is_png_name(e.path())) in_dir.push_back(e.path().string());
    if (in_dir.empty()) throw io::FileError(arg, "is a directory without .png files");
    std::sort(in_dir.begin(), in_dir.end());
    files.insert(files.end(), in_dir.begin(), in_dir.end());
  }
  return files;
}

io::RgbImage read_image(const std::string& path, int64_t factor, bool crop) {
  io::RgbImage img = io::read_png(path);
  if (img.width % factor == 0 && img.height % factor == 0) return img;
  const std::string size = std::to_string(img.width) + "x" + std::to_string(img.height);
  if (!crop)
    throw io::FileError(path, "is " + size + ": width and height must be multiples of " + std::to_string(factor) +
                                  " (the VAE's downsampling); crop or resize it, or pass --center-crop");
  if (img.width < factor || img.height < factor)
    throw io::FileError(path, "is " + size + ": smaller than " + std::to_string(factor) + " pixels, nothing to crop to");
  img = unet::center_crop(img, factor);
  std::cerr << "loom: " << path << ": centre-cropped " << size << " to " << img.width << "x" << img.height << "\n";
  return img;
}

int run_encode(const VaeArgs& a) {
  const std::vector<std::string> files = image_files(a.images);
  const VaePlacement where = place(a, force_upcast_of(a.vae));
  const unet::LoadedVae vae = load(a, where);
  const auto& c = vae.model->config();
  if (c.in_channels != 3)
    throw io::FileError(a.vae + "/config.json", "in_channels is " + std::to_string(c.in_channels) +
                                                  ": encode reads RGB images (in_channels 3)");
  Generator gen(a.seed);
  NoGradGuard no_grad;
  std::vector<Tensor> latents;
  io::RgbImage first;
  for (size_t i = 0; i < files.size(); ++i) {
    const io::RgbImage img = read_image(files[i], c.downsampling_factor(), a.center_crop);
    if (i == 0) first = img;
    if (img.width != first.width || img.height != first.height)
      throw io::FileError(files[i], "is " + std::to_string(img.width) + "x" + std::to_string(img.height) + " but " +
                                        files[0] + " is " + std::to_string(first.width) + "x" +
                                        std::to_string(first.height) + " (one latents tensor holds images of one size)");
    const Tensor x = unet::images_to_tensor({img}, where.dtype).to(where.device);
    const unet::LatentPosterior post = unet::latent_posterior(vae.model->encode(Variable(x)).tensor());
    const Tensor z = a.sample ? post.sample(gen) : post.mean;
    if (!io::all_finite(z)) throw trainer::NumericalError("encode: the latents of " + files[i] + " are not finite");
    latents.push_back(unet::scale_latents(z.to(DType::F64), c).to(DType::F32).to(Device::cpu()));
  }
  const Tensor out = ops::cat(latents, 0);
  nlohmann::json names = files;
  const std::map<std::string, std::string> meta = {
      {"images", names.dump()}, {"vae", a.vae},
      {"latents", a.sample ? "posterior sample, seed " + std::to_string(a.seed) : "posterior mean"},
      {"scaling", "(z - shift_factor) * scaling_factor"}};
  const bool h5 = a.out_file.size() > 3 && a.out_file.compare(a.out_file.size() - 3, 3, ".h5") == 0;
  if (h5)
    io::write_hdf5(a.out_file, {{"latents", out}}, {{"format", std::string("loom")}, {"kind", std::string("latents")}});
  else
    io::write_safetensors(a.out_file, {{"latents", out}}, meta);
  std::cout << "wrote " << a.out_file << ": latents " << out.shape() << " from " << files.size()
            << (files.size() == 1 ? " image" : " images") << " ("
            << (a.sample ? "posterior samples, seed " + std::to_string(a.seed) : "posterior means") << " × scaling_factor "
            << c.scaling_factor << ")\n";
  return 0;
}

}  // namespace

void add_vae_commands(CLI::App& app, VaeArgs& a) {
  auto* d = app.add_subcommand("decode", "Decode latents to PNG images with a diffusers AutoencoderKL (the VAE)");
  add_common_flags(d, a);
  d->add_option("--input", a.input, "safetensors or HDF5 file holding latents [N, C, h, w] (already × scaling_factor)")
      ->required();
  d->add_option("--key", a.key, "Name of the latents tensor in --input")->capture_default_str();
  d->add_option("--out", a.out_dir, "Output directory: one <input stem>_<i>.png per batch item")->required();

  auto* e = app.add_subcommand("encode", "Encode PNG images to latents with a diffusers AutoencoderKL (the VAE)");
  add_common_flags(e, a);
  e->add_option("--images", a.images, "PNG files or directories of them (one latents batch item each)")->required();
  e->add_option("--out", a.out_file, "Output file (.safetensors, or .h5) holding 'latents' [N, C, H/f, W/f]")
      ->required();
  e->add_flag("--sample", a.sample, "Draw from the posterior (mean + std·noise) instead of taking its mean");
  e->add_option("--seed", a.seed, "Seed of the noise of --sample")->capture_default_str();
  e->add_flag("--center-crop", a.center_crop,
              "Crop images whose sides are not multiples of the VAE's downsampling to the centre part that is");
}

int run_vae_command(const CLI::App& app, VaeArgs& a) {
  if (app.got_subcommand("decode")) return run_decode(a);
  if (app.got_subcommand("encode")) {
    if (app.get_subcommand("encode")->count("--seed") && !a.sample)
      throw trainer::OptionError("--seed goes with --sample (the posterior mean needs no noise)");
    return run_encode(a);
  }
  return -1;
}

}  // namespace loom::cli
