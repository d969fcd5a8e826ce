#!/usr/bin/env bash
# Where a step's GPU time goes: loom's own kernel attribution (LOOM_CUDA_PROFILE=1, see
# tensor/cuda/cuda_profile.cu) for the whole UNet (SDXL and SD 1.5, batch 4; eager, one table per
# phase: training step, forward, guided sampling step on 2N latents) and the SD 1.5 block step
# (bf16, f32; one table for the whole benchmark).
out=${1:-out}
prof() {  # name, command...
  local name=$1; shift
  LOOM_CUDA_PROFILE=1 "$@" 2>"$out/prof_$name.txt" >/dev/null
  echo "== $name"
  # every section's header, total and 12 largest rows
  awk '/^== /{n=0} {if (n++ < 14) print}' "$out/prof_$name.txt"
}
prof unet_sdxl_b4 ./build-gpu/bench/loom_bench_unet --config bench/gpu/configs/sdxl_unet.json --name sdxl --batch 4 --reps 3 --no-cuda-graph
prof unet_sd15_b4 ./build-gpu/bench/loom_bench_unet --config bench/gpu/configs/sd15_unet.json --name sd15 --batch 4 --reps 3 --no-cuda-graph
prof block_sd15_bf16 ./build-gpu/bench/loom_bench_step --config sd15 --precision bf16 --reps 10
prof block_sd15_f32 ./build-gpu/bench/loom_bench_step --config sd15 --precision f32 --reps 10
