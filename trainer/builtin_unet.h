// The built-in UNet task (SPEC §8, `loom train --builtin unet`): the diffusion objective on a
// small seeded UNet2DConditionModel, in seconds on the CPU.
//
// Base: a seeded SD-1.x-shaped UNet (CrossAttnDownBlock2D + DownBlock2D, mid block, UpBlock2D +
// CrossAttnUpBlock2D; 16/32 channels, 8×8 latents, context 6×16). Teacher: the same weights plus
// a hidden change — a rank-4 ΔW on every attn2 to_v (LoRA task) or new attn2 to_k / to_v weights
// (Custom Diffusion task), each ‖ΔW‖ = kChangeScale·‖W‖.
//
// Data (the design, so that the student's diffusion loss has its minimum exactly at the
// teacher): noisy latents x_t ~ N(0,1), timesteps t uniform in [50, 650], random conditioning;
// the noise is the teacher's epsilon prediction ε̂ = teacher(x_t, t, c), and the clean latents are
// latents = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, so that add_noise(latents, ε̂, t) = x_t. The data file holds
// latents, noise and timesteps, so the run goes through the ordinary `loom train --model UNET_DIR`
// path (noise and timesteps taken from the file); its epsilon loss is ‖student(x_t) − ε̂‖², zero at
// the teacher. The report: start and final loss, the share of the hidden change recovered
// (1 − ‖learned − hidden‖²/‖hidden‖² over the adapted weights), and that the saved adapter, loaded
// again onto the base model directory, reproduces the trained model's predictions.
// Files in out_dir: base_model/ (config.json + diffusion_pytorch_model.safetensors),
// data.safetensors, adapter.safetensors, checkpoint.h5, loss.csv, loss.png.
#pragma once

#include <iosfwd>

#include "trainer/builtin_task.h"

namespace loom::trainer {

// Passed: final loss ≤ 2% of the start (10% in bf16 / f16) and the reload error ≤ 1e-5 (1e-2).
BuiltinReport run_builtin_unet_task(const BuiltinOptions& options, std::ostream& out, std::ostream& log);

}  // namespace loom::trainer
