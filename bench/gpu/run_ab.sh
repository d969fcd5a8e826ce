#!/usr/bin/env bash
# One call on the H200 machine: the UNet's sampling loop of an older tree against this one, in the
# same call (loom's figures move by up to 2.6% between calls: docs/gpu-bench.md run 19).
#   OLD=.gl/old.tar ROUNDS=2 CONFIG=sdxl BATCH=4 REPS=10 CTEST_R=regex GEGLU=1 PEER=1 VARIANTS="A=1;B=2 C=3" PROFILE=1 \
#     bash bench/gpu/run_ab.sh [out]
# OLD is a `git archive` tarball of the older tree (ignored paths travel with `carry`; give it this
# tree's bench/gpu/bench_unet.cpp for --sampling-only); OLD=none runs this tree alone. Both trees are built side by side
# (loom_bench_unet; this tree also TARGETS), then the GPU tests matching CTEST_R run (each under
# CTEST_TIMEOUT seconds, default 300: a kernel whose barriers hang fails instead of eating the call), then
# --sampling-only runs alternate old / new ROUNDS times, then diffusers + PEFT's forward at the same
# config and batch (PEER=1), then this tree once per VARIANTS setting (';' between settings, each a
# space-separated list of NAME=VALUE environment settings), then (PROFILE=1) this tree's eager loop
# under LOOM_CUDA_PROFILE=1 (kernel table in profile.txt).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-out}
mkdir -p "$out"
cfg=bench/gpu/configs/${CONFIG:-sdxl}_unet.json
args=(--config "$cfg" --name "${CONFIG:-sdxl}" --batch "${BATCH:-4}" --reps "${REPS:-10}")
old=/tmp/loom-old
with_old=1
[ "${OLD:-}" = none ] && with_old=0
[ $with_old = 1 ] && rm -rf "$old" && mkdir -p "$old" && tar -xf "${OLD:-.gl/old.tar}" -C "$old"
flags=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90)
# The machine of this call: diffusers' figures are bound by Python on the host's CPU and move by up
# to 1.8x between calls (docs/gpu-bench.md runs 19-22), so each run names its CPU and load.
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null
  echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$out/env.txt"
t0=$(date +%s)
[ $with_old = 1 ] && (cmake -S "$old" -B "$old/build" "${flags[@]}" >"$out/configure-old.log" 2>&1 &&
  cmake --build "$old/build" -j8 --target loom_bench_unet >"$out/build-old.log" 2>&1
  echo "old build rc=$?") &
cmake -S . -B build-gpu "${flags[@]}" >"$out/configure.log" 2>&1 &&
  cmake --build build-gpu -j$((16 / (1 + with_old))) --target loom_bench_unet ${TARGETS:-} -- -k 0 >"$out/build.log" 2>&1
echo "new build rc=$?"
wait
grep -E "error|FAILED" -A3 "$out/build.log" | head -30
echo "builds: $(($(date +%s) - t0)) s"
if [ -n "${CTEST_R:-}" ]; then
  ctest --test-dir build-gpu -L gpu -R "$CTEST_R" -j4 --timeout "${CTEST_TIMEOUT:-300}" --output-on-failure >"$out/ctest-gpu.log" 2>&1
  echo "ctest -L gpu -R '$CTEST_R' rc=$?"; grep -E "tests passed|tests failed|Failed|\*\*\*" "$out/ctest-gpu.log" | head -20
fi
# GEGLU=1: loom_bench_geglu (TARGETS must name it): the Linear + GEGLU kernel against cuBLAS + the
# GEGLU pass, then loom's GEMM (LOOM_GEMM_WGMMA) against cuBLAS(Lt) on the UNet's other Linears and
# its 3×3 convolutions' products
if [ "${GEGLU:-0}" = 1 ]; then
  ./build-gpu/bench/loom_bench_geglu --reps 30 | tee "$out/geglu.jsonl"
fi
# The old tree's bench may predate --sampling-only: it then runs every phase (its JSON has the same
# sample_loop_fused_step_ms field).
old_args=("${args[@]}")
[ $with_old = 1 ] && grep -q -- "--sampling-only" "$old/bench/gpu/bench_unet.cpp" && old_args+=(--sampling-only)
for r in $(seq "${ROUNDS:-2}"); do
  [ $with_old = 1 ] && { echo "== round $r old"; "$old/build/bench/loom_bench_unet" "${old_args[@]}"; }
  echo "== round $r new"; ./build-gpu/bench/loom_bench_unet "${args[@]}" --sampling-only
done 2>&1 | tee "$out/ab.jsonl"
if [ "${PEER:-0}" = 1 ]; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
    export PYTHONPATH=/tmp/site
  fi
  python3 bench/gpu/diffusers_unet.py "${args[@]}" 2>&1 | tee "$out/peer.jsonl"
fi
IFS=';' read -ra vs <<<"${VARIANTS:-}"
for v in "${vs[@]}"; do
  echo "== $v"; env $v ./build-gpu/bench/loom_bench_unet "${args[@]}" --sampling-only
done 2>&1 | tee "$out/variants.jsonl"
if [ "${PROFILE:-0}" = 1 ]; then
  LOOM_CUDA_PROFILE=1 ./build-gpu/bench/loom_bench_unet "${args[@]}" --sampling-only --no-cuda-graph >"$out/profile.jsonl" \
    2>"$out/profile.txt"
  echo "profile rc=$?"
fi
