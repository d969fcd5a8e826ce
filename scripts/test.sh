#!/usr/bin/env bash
# The whole check on a fresh machine: set-up, build (CUDA too when nvcc is
# found), every test; then a second build under AddressSanitizer +
# UndefinedBehaviorSanitizer (CPU only) and every test again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

jobs=$(nproc)
# ctest -j"$jobs" runs $jobs test processes at once, each with an OpenMP team of $jobs threads: with
# more threads than cores, libgomp's default spin-waiting burns the cores the other test needs
# (measured: two concurrent test_unet gradchecks took 17 s instead of 8.5 s). Passive waiting changes
# no result, only how idle threads wait.
export OMP_WAIT_POLICY=passive
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$jobs"
ctest --test-dir build -j"$jobs" --output-on-failure

# -g1: line tables and function names (what sanitizer reports print), not full debug info, which
# costs a large share of the compile time on CI's two cores.
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOOM_SANITIZE=ON -DLOOM_CUDA=OFF \
  -DLOOM_BUILD_BENCH=OFF -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG"
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan -j"$jobs" --output-on-failure
