#!/usr/bin/env bash
# One call on the H200 machine (../shared/GPU.md): build the named targets, run the GPU tests and
# the GPU benchmarks (loom and PyTorch in the same call). Logs go to $OUT (or ./out).
#   STEPS="tests ctest bench variants benchmath torch model unet profile ncu conv cudnn cli" TARGETS="test_gpu loom_bench_flash" bash scripts/gpu_session.sh
# STEPS unset runs "tests bench torch"; STEPS="" builds only. "variants": the flash kernels' other
# paths at the head dims where they compete (mma.sync against wgmma, the wgmma backward's block
# sizes, a forward block), or the settings VARIANTS lists ("A=1 B=2;C=3": ';' between settings).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
steps=${STEPS-"tests bench torch"}
targets=${TARGETS:-"test_gpu loom_bench_flash loom"}
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # the host's CPU and load: diffusers' figures are bound by Python on it and move between calls
  echo "host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg)"
  nvcc --version | tail -1
  python3 -c 'import torch; print("torch", torch.__version__)' 2>/dev/null
} | tee "$out/env.txt"
# cuDNN (LOOM_CONV=cudnn): the toolkit's, else the nvidia-cudnn wheel of the PyTorch install (it
# carries include/cudnn.h and lib/libcudnn*.so.9; the H200 machine's toolkit has no cuDNN headers)
if [ -z "${CUDNN_ROOT:-}" ]; then
  CUDNN_ROOT=$(python3 -c 'import nvidia.cudnn as c; print(list(c.__path__)[0])' 2>/dev/null || true)
fi
if [ -n "${CUDNN_ROOT:-}" ] && [ -f "$CUDNN_ROOT/include/cudnn.h" ]; then
  export CUDNN_ROOT LD_LIBRARY_PATH="$CUDNN_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "cudnn root: $CUDNN_ROOT" | tee -a "$out/env.txt"
fi
t0=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCUDNN_ROOT="${CUDNN_ROOT:-}" >"$out/configure.log" 2>&1 \
  || { tail -30 "$out/configure.log"; exit 1; }
cmake --build build-gpu -j16 --target $targets -- -k 0 >"$out/build.log" 2>&1 \
  || { echo "BUILD FAILED"; grep -E "error|FAILED" -A3 "$out/build.log" | head -40; }
echo "build: $(( $(date +%s) - t0 )) s"
for s in $steps; do
  case $s in
    tests)
      ./build-gpu/tests/test_gpu ${GTEST_FILTER:+--gtest_filter=$GTEST_FILTER} >"$out/test_gpu.log" 2>&1
      echo "test_gpu rc=$?"; grep -E "^\[  (PASSED|FAILED) |tests ran|Failure|error" "$out/test_gpu.log" | head -40 ;;
    ctest)
      ctest --test-dir build-gpu -L gpu -j${CTEST_JOBS:-1} --output-on-failure >"$out/ctest-gpu.log" 2>&1
      echo "ctest -L gpu rc=$?"; grep -E "tests passed|tests failed|Failed" "$out/ctest-gpu.log" | head -30 ;;
    bench)
      ./build-gpu/bench/loom_bench_flash --reps 30 | tee "$out/bench_flash.txt" ;;
    variants)
      # VARIANTS: environment settings separated by ';' (each a space-separated list of NAME=VALUE)
      shapes="--shape 2,8,4096,4096,40 --shape 2,8,4096,4096,64 --shape 2,10,4096,4096,64 --shape 2,20,1024,1024,64"
      # default: the backward switches not yet measured (docs/flash-notes.md, eighth session)
      IFS=';' read -ra vs <<<"${VARIANTS:-LOOM_X=default;LOOM_FLASH_BWD_PIPE=1;LOOM_FLASH_BWD_DQ_BULK=all;LOOM_FLASH_BWD_PIPE=1 LOOM_FLASH_BWD_DQ_BULK=all;LOOM_FLASH_BWD_DQ_BULK=all LOOM_FLASH_BWD_WGMMA_KEYS=128}"
      for v in "${vs[@]}"; do
        echo "== $v"; env $v ./build-gpu/bench/loom_bench_flash --reps 30 $shapes
      done | tee "$out/bench_variants.txt" ;;
    benchmath)
      ./build-gpu/bench/loom_bench_flash --backend math --reps 20 | tee "$out/bench_math.txt" ;;
    torch)
      python3 bench/gpu/torch_attention.py --reps 30 | tee "$out/torch_attention.txt" ;;
    model)
      bash bench/gpu/run_model_bench.sh "$out" ;;
    unet)
      bash bench/gpu/run_unet_bench.sh "$out" ;;
    profile)
      bash bench/gpu/profile_steps.sh "$out" ;;
    ncu)
      bash bench/gpu/ncu_flash.sh "$out" ;;
    conv)
      ./build-gpu/bench/loom_bench_conv --reps ${REPS:-20} | tee "$out/bench_conv.txt"
      python3 bench/gpu/torch_conv.py --reps ${REPS:-20} | tee "$out/torch_conv.txt" ;;
    cudnn)
      ls /usr/include/cudnn*.h /usr/local/cuda/include/cudnn*.h /usr/lib/x86_64-linux-gnu/libcudnn* 2>&1 | head
      ls "${CUDNN_ROOT:-/nonexistent}"/include/cudnn.h "${CUDNN_ROOT:-/nonexistent}"/lib 2>&1 | head
      grep -i cudnn "$out/configure.log" | head -3
      python3 -c 'import torch; print("torch cudnn", torch.backends.cudnn.version())' ;;
    cli)
      bash bench/gpu/cli_gpu_check.sh "$out" 2>&1 | tee "$out/cli_gpu.txt" ;;
  esac
done
