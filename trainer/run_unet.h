// `loom run --model UNET_DIR` (SPEC §8): the UNet's prediction for every sample of an input file,
// with adapters as `loom run` attaches them (attach_adapters), on any device and precision.
//
// Input file (safetensors or HDF5):
//   sample [N, in_channels, h, w]            (any h, w)
//   timestep [N], [1] or []                  (fractional values allowed)
//   encoder_hidden_states [N, K, C]          (C = cross_attention_dim)
//   encoder_attention_mask [N, K]            optional keep-mask
//   text_embeds [N, D], time_ids [N, 6]      SDXL (addition_embed_type "text_time")
// Output: `output` [N, out_channels, h, w] (f32). Other keys are named in a note, never dropped
// silently.
#pragma once

#include <string>

#include "trainer/run.h"

namespace loom::trainer {

struct UNetRunInputs {
  Tensor sample, timestep, encoder_hidden_states, encoder_attention_mask, text_embeds, time_ids;
  std::vector<std::string> unused_keys;
  // Reads the file (float tensors converted to f32); io::FileError naming the file for a missing
  // sample, timestep or encoder_hidden_states.
  static UNetRunInputs load(const std::string& path);
};

// RunOptions as for a block (prefix must be empty: a UNet directory is the whole model).
// Throws io::FileError for bad files or inputs that do not fit the model (naming `input_name`,
// the tensor and the shapes), NumericalError for a non-finite output.
RunResult run_unet(const RunOptions& options, const UNetRunInputs& inputs, const std::string& input_name);

}  // namespace loom::trainer
