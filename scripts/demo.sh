#!/usr/bin/env bash
# The main job on a fresh machine: set up, build, run the built-in training task
# (a LoRA learns a hidden change of a seeded spatial transformer), then run the
# trained adapter with `loom run` and show what was written.
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
