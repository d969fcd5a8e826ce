#!/usr/bin/env bash
# The whole UNet (issue 11): loom's and diffusers + PEFT's training step, forward and guided sampling
# step at SD 1.5 (64×64 latents) and SDXL (128×128) configs, batch 1 and 4, in one call.
#   CONFIGS="sd15 sdxl"  BATCHES="1 4"  PAIRS=1  REPS=10   (the defaults)
# PAIRS > 1 runs loom then diffusers that many times per (config, batch), so that the spread of
# diffusers' host-bound figures within one call shows next to loom's.
out=${1:-out}
b=./build-gpu/bench/loom_bench_unet
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site
fi
for cfg in ${CONFIGS:-sd15 sdxl}; do
  for n in ${BATCHES:-1 4}; do
    for _ in $(seq "${PAIRS:-1}"); do
      $b --config bench/gpu/configs/${cfg}_unet.json --name $cfg --batch $n --reps ${REPS:-10}
      python3 bench/gpu/diffusers_unet.py --config bench/gpu/configs/${cfg}_unet.json --name $cfg --batch $n --reps ${REPS:-10}
    done
  done
done 2>&1 | tee "$out/bench_unet.jsonl"
