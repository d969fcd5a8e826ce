#!/usr/bin/env bash
# loom's block step / forward and diffusers + PEFT's, one after the other in one call.
out=${1:-out}
b=./build-gpu/bench/loom_bench_step
for cfg in sd15 sdxl; do
  for prec in f32 bf16; do
    for be in auto math; do $b --config $cfg --precision $prec --backend $be; done
  done
done | tee "$out/bench_step_loom.jsonl"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site
fi
python3 bench/gpu/diffusers_step.py | tee "$out/bench_step_diffusers.jsonl"
