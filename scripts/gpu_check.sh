#!/usr/bin/env bash
# Build, GPU tests and benchmarks on the H200 machine (../shared/GPU.md), in one call.
# Logs go to $OUT (or ./out) so they come back.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1
} | tee "$out/env.txt"

cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 >"$out/configure.log" 2>&1 \
  || { tail -30 "$out/configure.log"; exit 1; }
cmake --build build-gpu -j16 -- -k 0 >"$out/build.log" 2>&1 || { echo "BUILD FAILED (continuing with what built)"; grep -E "error|FAILED" -A3 "$out/build.log" | head -40; }

ctest --test-dir build-gpu -L gpu --output-on-failure >"$out/ctest-gpu.log" 2>&1
echo "gpu tests rc=$?"; grep -E "tests passed|tests failed|Failed|\*\*\*" "$out/ctest-gpu.log" | head -40
ctest --test-dir build-gpu -LE gpu -j8 >"$out/ctest-cpu.log" 2>&1
echo "other tests rc=$?"; grep -E "tests passed|tests failed" "$out/ctest-cpu.log"
if [ "${LOOM_GPU_CHECK_BENCH:-1}" = 1 ] && [ -x build-gpu/bench/loom_bench_matmul ]; then
  ./build-gpu/bench/loom_bench_matmul --benchmark_filter=2048 >"$out/bench_matmul.txt" 2>&1
  tail -3 "$out/bench_matmul.txt"
fi
