#!/usr/bin/env bash
# The whole check on a fresh machine (CI runs this: .ci/run): set-up, one build, every test.
#
# One build, not a plain one and a sanitized one: the library and the CLI are compiled once, with
# AddressSanitizer + UndefinedBehaviorSanitizer at -O2, the tests' and benchmarks' own code plainly
# at -O1 (it links the sanitizers' runtime; the library it calls is what they check), and every test
# runs once; the CUDA kernels are compiled too when nvcc is found (nvcc's host code is not
# instrumented), so CUDA code that does not build never lands. Measured on a 2-core machine like
# CI's, 2026-11-30: the old two builds and two test runs about 50 minutes, this one 21-23 minutes
# (docs/ci.md).
# A plain optimized build for work and benchmarks: cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
#
#   LOOM_TEST_BUILD_DIR  the build directory (default build-ci)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${LOOM_TEST_BUILD_DIR:-build-ci}
bash scripts/setup.sh --system

# The optional Python packages of the interop tests (pip: mostly download time on a fresh machine)
# install while the build compiles; the configure step is re-run once they are in, so that the
# interop tests are registered exactly as after a plain `bash scripts/setup.sh`.
mkdir -p "$build"
bash scripts/setup.sh --python >"$build/setup-python.log" 2>&1 &
python_setup=$!
trap 'kill "$python_setup" 2>/dev/null || true' EXIT

jobs=$(nproc)
# ctest -j"$jobs" runs $jobs test processes at once, each with an OpenMP team of $jobs threads: with
# more threads than cores, libgomp's default spin-waiting burns the cores the other test needs
# (measured: two concurrent test_unet gradchecks took 17 s instead of 8.5 s). Passive waiting changes
# no result, only how idle threads wait.
export OMP_WAIT_POLICY=passive
# -g1: line tables and function names (what sanitizer reports print), not full debug info, which
# costs a large share of the compile time on CI's two cores.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOOM_SANITIZE=ON \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -g1 -DNDEBUG" -DCMAKE_CUDA_FLAGS_RELWITHDEBINFO="-O2 -DNDEBUG"
cmake --build "$build" -j"$jobs"

python_rc=0
wait "$python_setup" || python_rc=$?
cat "$build/setup-python.log"
[ "$python_rc" -eq 0 ] || { echo "test.sh: scripts/setup.sh --python failed ($python_rc)" >&2; exit "$python_rc"; }
cmake -S . -B "$build" >/dev/null
cmake --build "$build" -j"$jobs"

# protect_shadow_gap=0: the CUDA driver maps memory where ASan's shadow gap would be (only matters
# where a GPU is present; harmless elsewhere).
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:protect_shadow_gap=0 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir "$build" -j"$jobs" --output-on-failure
