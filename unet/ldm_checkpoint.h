// Single-file original checkpoints (the LDM / SGM layout A1111 and ComfyUI users
// hold: `model.diffusion_model.input_blocks.1.0.in_layers.0.weight`, …) loaded
// into a UNet2DConditionModel built from a diffusers config.json (SPEC §8), with
// the key mapping of diffusers' convert_ldm_unet_checkpoint:
//   time_embed.{0,2} / label_emb.0.{0,2} -> time_embedding / add_embedding.linear_{1,2}
//   input_blocks.0.0 -> conv_in; input_blocks.k.0 / .1 -> down_blocks.i.resnets.j / attentions.j
//   (k counts resnets and downsamplers in order from 1); input_blocks.k.0.op -> downsamplers.0.conv
//   middle_block.{0,1,2} -> mid_block.resnets.0, attentions.0, resnets.1
//   output_blocks.k.0 / .1 -> up_blocks.i.resnets.j / attentions.j; the block's last k holds the
//   upsampler at .1.conv (no attentions) or .2.conv
//   out.0 / out.2 -> conv_norm_out / conv_out
//   inside resnets: in_layers.0 norm1, in_layers.2 conv1, emb_layers.1 time_emb_proj,
//   out_layers.0 norm2, out_layers.3 conv2, skip_connection conv_shortcut.
// Keys outside model.diffusion_model. (VAE, text encoders) are skipped with a note;
// a UNet key the model lacks, or a parameter the file lacks, is an io::FileError
// naming both spellings. A 1×1 conv stored where the model has a Linear (or the
// reverse: proj_in / proj_out) is reshaped.
#pragma once

#include <map>
#include <string>

#include "unet/unet_io.h"

namespace loom::unet {

// The original-checkpoint name (without "model.diffusion_model.") of every parameter of `model`.
std::map<std::string, std::string> ldm_names(const UNet2DConditionModel& model);

LoadedUNet load_unet_single_file(const std::string& weights_path, const std::string& config_path,
                                 const UNetLoadOptions& options = {});

}  // namespace loom::unet
