#!/usr/bin/env bash
# The main job on a fresh machine: set up, build, run the built-in training tasks —
# (1) a LoRA learns a hidden change of a seeded spatial transformer, then `loom run` applies
# the trained adapter; (2) the built-in UNet task: a LoRA on a small seeded UNet2DConditionModel
# learns a teacher's hidden change through the diffusion (epsilon) loss — and show what was written.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target loom
out=${1:-loom-builtin}
./build/examples/loom train --out "$out"
./build/examples/loom run --model "$out/base_model" --input "$out/data.safetensors" \
  --adapter "$out/adapter.safetensors" --output "$out/output.safetensors"
./build/examples/loom inspect "$out/adapter.safetensors" | head -12
unet_out=${2:-loom-builtin-unet}
./build/examples/loom train --builtin unet --out "$unet_out"
./build/examples/loom inspect "$unet_out/adapter.safetensors" | head -12
