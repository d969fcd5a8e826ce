#!/usr/bin/env bash
# One call on the H200 machine: the flash forward's blocks (LOOM_FLASH_FWD_TILE) against each other
# and PyTorch's SDPA backends at the same shapes, after the forward tests of every block.
#   TILES="'' ws2x128 sync" SHAPES="8,10,4096,4096,64 8,20,1024,1024,64" TEST_TIMEOUT=240 \
#     bash bench/gpu/run_flash_tiles.sh [out]
# '' is the default block (ws3x128), sync the block-synchronous kernel's own choice. Each step has
# a timeout: a kernel that waits on a barrier that never completes hangs rather than fails. Builds
# build-gpu (test_gpu, loom_bench_flash, and TARGETS).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-out}
mkdir -p "$out"
tiles=${TILES:-"'' ws3x128s3 ws2x128 sync 3x128 4x128"}
shapes=${SHAPES:-"2,8,4096,4096,40 2,8,4096,4096,64 8,10,4096,4096,64 8,20,1024,1024,64 2,20,1024,1024,64"}
shape_args=()
for s in $shapes; do shape_args+=(--shape "$s"); done
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 >"$out/configure.log" 2>&1 &&
  cmake --build build-gpu -j16 --target test_gpu loom_bench_flash ${TARGETS:-} -- -k 0 >"$out/build.log" 2>&1
echo "build rc=$? ($(($(date +%s) - t0)) s)"
grep -E "error|FAILED" -A3 "$out/build.log" | head -30
if [ "${TEST_TIMEOUT:-240}" != 0 ]; then
  timeout "${TEST_TIMEOUT:-240}" ./build-gpu/tests/test_gpu --gtest_filter="${GTEST_FILTER:-FlashCudaForwardPaths*:FlashPacked*}" \
    >"$out/flash_tests.log" 2>&1
  echo "forward tests rc=$? (124: timed out)"
  grep -E "^\[  (PASSED|FAILED) |Failure|seed|LOOM_FLASH_FWD_TILE=" "$out/flash_tests.log" | head -40
fi
for tile in $tiles; do
  tile=${tile//\'/}
  echo "== LOOM_FLASH_FWD_TILE='$tile'"
  LOOM_FLASH_FWD_TILE=$tile timeout 60 ./build-gpu/bench/loom_bench_flash --reps "${REPS:-30}" "${shape_args[@]}"
  echo "rc=$?"
done 2>&1 | tee "$out/flash_tiles.txt"
timeout 150 python3 bench/gpu/torch_attention.py --reps "${REPS:-30}" "${shape_args[@]}" 2>&1 | tee "$out/torch_attention.txt"
echo "total: $(($(date +%s) - t0)) s"
