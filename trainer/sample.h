// What `loom sample` does (SPEC §8): loads a UNet directory, attaches adapters as `loom run`
// does, and denoises latents with classifier-free guidance and one of diffusers' schedulers
// (unet/sampling.h, unet/schedulers.h).
//
// Input file (safetensors or HDF5):
//   encoder_hidden_states [N, K, C]             the prompt's embeddings (required)
//   negative_encoder_hidden_states [N, K, C]    the negative prompt's (required when guidance > 1)
//   latents [N, C_in, h, w]                     optional: the first step's input, already multiplied
//                                               by the scheduler's init_noise_sigma; without it, seeded
//                                               noise of height/8 × width/8 is drawn and multiplied
//   encoder_attention_mask, negative_encoder_attention_mask [N, K]   optional keep-masks
//   text_embeds, negative_text_embeds [N, D], time_ids, negative_time_ids [N, 6]   SDXL (text_time)
// Other keys are reported as unused (SampleResult::notes), never dropped silently.
#pragma once

#include <iosfwd>
#include <optional>
#include <string>
#include <vector>

#include "trainer/run.h"
#include "unet/sampling.h"

namespace loom::trainer {

struct SampleInputs {
  Tensor latents;  // undefined: seeded noise
  unet::SamplingConditioning cond;
  std::vector<std::string> unused_keys;
  // Reads the file (tensors converted to f32); io::FileError for a bad file or a missing
  // encoder_hidden_states.
  static SampleInputs load(const std::string& path);
};

struct SampleOptions {
  std::string model_dir;  // a UNet directory, or a single-file checkpoint with `config` (unet::load_unet)
  std::string config;     // --config: the diffusers config.json of a single-file checkpoint
  std::vector<AdapterSpec> adapters;
  std::string scheduler = "ddim";  // ddim | euler | dpmpp_2m
  std::string scheduler_config;    // diffusers' scheduler_config.json; "" = SD 1.5's (SPEC §8)
  int64_t steps = 30;
  double guidance_scale = 7.5;
  std::optional<uint64_t> seed;    // seeded noise (default 0) when the input has no latents
  std::optional<int64_t> height, width;  // pixels, multiples of 8 (default: sample_size · 8)
  bool strict = true;
  std::string device = "cpu";  // cpu | cuda | cuda:N | auto
  std::string precision;       // empty: the device's default (SPEC §7)
  bool cuda_graph = true;      // on CUDA: replay the UNet's forward from a graph (unet::SamplingOptions)
  // LoRA adapters (any LoraSet kind) fused into the weights before the first step (LoraSet::fuse:
  // W + Σ w·s·B·A in f64, rounded once to the weights' dtype), as A1111 / ComfyUI and diffusers'
  // fuse_lora() run them: the steps then cost what the plain UNet costs. false: the low-rank
  // products run at every step (the same function; they differ by the dtype's rounding).
  bool fuse = true;
};

struct SampleResult {
  Tensor latents;  // the final latents [N, C, h, w], f32 on the CPU
  std::vector<double> timesteps;
  double init_noise_sigma = 1.0;
  std::vector<io::AdapterLoadReport> reports;
  std::vector<std::string> notes;  // model config and scheduler config notes, unused input keys
  bool fused = false;              // the LoRA adapters were fused into the weights (SampleOptions::fuse)
  int64_t graph_replays = 0;       // steps whose UNet forward was a CUDA graph replay
  std::string graph_note;          // why graphs were not used although asked for, or ""
};

// The latent size of seeded noise: VAE downsampling factor of Stable Diffusion's autoencoders.
constexpr int64_t kVaeScaleFactor = 8;

// Throws OptionError for bad options (scheduler, steps, guidance, height/width, seed with given
// latents), io::FileError for bad files (model, adapters, scheduler config, input tensors and
// their shapes, naming `input_name` and the key), NumericalError when the latents are not finite.
// Notes and adapter load reports go to `log` before sampling starts, progress (one line per step:
// step, timestep, s/step, ETA) to `progress`, each when given.
SampleResult sample_model(const SampleOptions& options, const SampleInputs& inputs, const std::string& input_name,
                          std::ostream* log = nullptr, std::ostream* progress = nullptr);

}  // namespace loom::trainer
