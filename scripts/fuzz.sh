#!/usr/bin/env bash
# Fuzzes the safetensors parser with libFuzzer (needs clang and its runtime, e.g. Debian's
# clang and libclang-rt-14-dev). Usage: bash scripts/fuzz.sh [seconds]   (default 60)
# New inputs go to build-fuzz/corpus; tests/io/corpus is the small corpus kept in the repo.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang++ >/dev/null 2>&1; then
  echo "fuzz: clang++ not found; install clang and libclang-rt-dev to build the fuzz target"
  exit 0
fi
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOOM_CUDA=OFF \
  -DLOOM_BUILD_BENCH=OFF >/dev/null
cmake --build build-fuzz --target fuzz_safetensors
mkdir -p build-fuzz/corpus
./build-fuzz/tests/fuzz_safetensors build-fuzz/corpus tests/io/corpus -max_total_time="${1:-60}"
