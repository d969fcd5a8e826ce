#include "examples/cli_sample.h"

#include <sys/stat.h>

#include <iostream>

#include "examples/cli_common.h"
#include "io/tensor_file.h"

namespace loom::cli {
namespace {

bool same_existing_file(const std::string& a, const std::string& b) {
  struct stat sa {}, sb {};
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// Writes `latents` as `loom run` writes its output: HDF5 for .h5 / .hdf5, else safetensors.
void write_latents(const std::string& path, const Tensor& latents) {
  if (ends_with(path, ".h5") || ends_with(path, ".hdf5"))
    io::write_hdf5(path, {{"latents", latents}}, {{"format", std::string("loom")}, {"kind", std::string("latents")}});
  else
    io::write_safetensors(path, {{"latents", latents}});
}

}  // namespace

CLI::App* add_sample(CLI::App& app, SampleArgs& a) {
  auto* s = app.add_subcommand("sample", "Denoise latents with a UNet (and adapters): DDIM, Euler or DPM++ 2M with "
                                         "classifier-free guidance");
  s->add_option("--model", a.model,
                "UNet directory (diffusers' config.json + diffusion_pytorch_model.safetensors), or a single-file "
                "original checkpoint with --config")
      ->required();
  s->add_option("--config", a.config, "The diffusers UNet config.json of a single-file checkpoint given as --model");
  s->add_option("--input", a.input,
                "Conditioning file: encoder_hidden_states, negative_encoder_hidden_states, optional latents "
                "(SDXL: text_embeds, time_ids and their negative_ counterparts)")
      ->required();
  s->add_option("--output", a.output, "Output file (.safetensors, or .h5 for HDF5) holding the final 'latents'")
      ->required();
  s->add_option("--steps", a.steps, "Inference steps")->capture_default_str();
  s->add_option("--scheduler", a.scheduler, "ddim | euler | dpmpp_2m")->capture_default_str();
  s->add_option("--scheduler-config", a.scheduler_config,
                "diffusers' scheduler_config.json (default: Stable Diffusion 1.5's, timestep_spacing leading)");
  s->add_option("--guidance-scale", a.guidance_scale, "Classifier-free guidance scale (≤ 1: no guidance)")
      ->capture_default_str();
  s->add_option("--adapter", a.adapters, "Adapter file, optionally FILE:WEIGHT; repeatable");
  s->add_option("--seed", a.seed, "Seed of the starting noise when the input has no latents (default 0)");
  s->add_option("--height", a.height, "Image height in pixels for seeded noise (latents: height/8; default "
                                      "sample_size·8)");
  s->add_option("--width", a.width, "Image width in pixels for seeded noise (latents: width/8)");
  s->add_flag("--quiet", a.quiet, "No progress on stderr");
  a.device = "auto";
  s->add_option("--device", a.device, "cpu | cuda | cuda:N | auto (cuda:0 when a GPU is usable, else cpu)")
      ->capture_default_str();
  s->add_option("--precision", a.precision, "f32 | tf32 | bf16 | f16 (default: bf16 on CUDA, f32 on the CPU)");
  s->add_flag("--no-cuda-graph", a.no_cuda_graph,
              "On CUDA, run the UNet eagerly at every step instead of replaying a CUDA graph of its forward "
              "captured at the second step");
  s->add_flag("--deterministic", a.deterministic,
              "Bit-for-bit repeatable runs on CUDA (the CPU always is): no timed GEMM algorithms, f32 attention "
              "without TF32");
  s->add_flag("--no-fuse", a.no_fuse,
              "Apply LoRA adapters as low-rank products at every step instead of fusing them into the weights "
              "once (W + w·scale·B·A in f64) before the first step");
  return s;
}

int run_sample(const SampleArgs& a, const CLI::App& cmd) {
  trainer::SampleOptions o;
  o.model_dir = a.model, o.config = a.config, o.scheduler = a.scheduler, o.scheduler_config = a.scheduler_config;
  o.steps = a.steps, o.guidance_scale = a.guidance_scale;
  if (cmd.count("--seed")) o.seed = a.seed;
  if (cmd.count("--height")) o.height = a.height;
  if (cmd.count("--width")) o.width = a.width;
  try {  // flags first: a usage error is reported before any file is read
    try {
      unet::parse_scheduler_kind(a.scheduler);
    } catch (const Error& e) {
      throw Error(std::string("--scheduler: ") + e.what());
    }
    if (a.steps < 1) throw Error("--steps must be at least 1, got " + std::to_string(a.steps));
    for (const auto& s : a.adapters) o.adapters.push_back(trainer::AdapterSpec::parse(s));
    const trainer::Placement p = trainer::placement_of(a.device, a.precision);
    std::cerr << placement_line(p, a.deterministic) << "\n";
  } catch (const Error& e) {
    throw trainer::OptionError(e.what());
  }
  o.device = a.device, o.precision = a.precision, o.cuda_graph = !a.no_cuda_graph, o.fuse = !a.no_fuse;
  if (same_existing_file(a.output, a.input))
    throw trainer::OptionError("--output " + a.output + " is the --input file " + a.input + ": it would be replaced");
  for (const auto& spec : o.adapters)
    if (same_existing_file(a.output, spec.path))
      throw trainer::OptionError("--output " + a.output + " is the --adapter file " + spec.path + ": it would be replaced");

  const trainer::SampleInputs inputs = trainer::SampleInputs::load(a.input);
  const trainer::SampleResult r =
      trainer::sample_model(o, inputs, a.input, &std::cerr, a.quiet ? nullptr : &std::cerr);
  if (!r.graph_note.empty()) std::cerr << "loom: warning: " << r.graph_note << "\n";
  if (r.graph_replays > 0)
    std::cerr << "loom: " << r.graph_replays << " of " << r.timesteps.size()
              << " steps replayed the UNet from a CUDA graph (--no-cuda-graph: none)\n";
  write_latents(a.output, r.latents);
  // Hook for decoding (issue 11, `--vae DIR`): r.latents [N, 4, h, w] are the UNet's latents;
  // divide by the VAE's scaling_factor and decode them into PNGs here.
  std::cout << "wrote " << a.output << ": latents " << r.latents.shape() << " (" << o.scheduler << ", "
            << r.timesteps.size() << " steps, guidance " << o.guidance_scale << ")\n";
  return 0;
}

}  // namespace loom::cli
