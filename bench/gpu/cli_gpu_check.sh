#!/usr/bin/env bash
# The command line on cuda:0 against the CPU (issue 9): the built-in task for 20 steps on both
# devices (losses within 1e-4 relative in f32, 2e-2 in bf16), the whole built-in task in bf16 on
# the GPU, and `loom run` of the trained adapter on both devices.
out=${1:-out}
loom=./build-gpu/examples/loom
w=$(mktemp -d)
set -x
# 20 steps (the task's own convergence check then fails: exit 1 is expected); bf16 is compared with
# the CPU's bf16 (the same policy: bf16 storage, f32 compute), f32 with the CPU's f32.
$loom train --device cpu --steps 20 --out $w/cpu --quiet > $w/cpu.txt 2>&1; echo "cpu rc=$?"
$loom train --device cpu --precision bf16 --steps 20 --out $w/cpu16 --quiet > $w/cpu16.txt 2>&1; echo "cpu bf16 rc=$?"
$loom train --device cuda --precision f32 --steps 20 --out $w/gpu32 --quiet > $w/gpu32.txt 2>&1; echo "gpu f32 rc=$?"
$loom train --device cuda --precision bf16 --steps 20 --out $w/gpu16 --quiet > $w/gpu16.txt 2>&1; echo "gpu bf16 rc=$?"
set +x
python3 - "$w" <<'PY'
import csv, sys
w = sys.argv[1]
def losses(d):
    return [float(r["loss"]) for r in csv.DictReader(open(f"{w}/{d}/loss.csv"))]
for d, ref, tol in (("gpu32", "cpu", 1e-4), ("gpu16", "cpu16", 2e-2)):
    try:
        g, cpu = losses(d), losses(ref)
        worst = max(abs(a - b) / abs(b) for a, b in zip(g, cpu))
        print(f"{d}: {len(g)} steps, worst relative loss difference vs {ref} {worst:.2e} (tolerance {tol}): {'ok' if worst <= tol else 'FAILED'}")
    except Exception as e:
        print(d, "FAILED", e)
PY
$loom train --device cuda --out $w/full16 2>&1 | tee $out/builtin_cuda_bf16.txt | tail -12
$loom run --device cuda --model $w/full16/base_model --input $w/full16/data.safetensors --adapter $w/full16/adapter.safetensors --output $w/run_gpu.safetensors 2>&1 | tail -3
$loom run --device cpu --model $w/full16/base_model --input $w/full16/data.safetensors --adapter $w/full16/adapter.safetensors --output $w/run_cpu.safetensors 2>&1 | tail -2
python3 - "$w" <<'PY'
import sys
from safetensors.numpy import load_file
w = sys.argv[1]
a, b = load_file(f"{w}/run_gpu.safetensors")["output"], load_file(f"{w}/run_cpu.safetensors")["output"]
import numpy as np
e = np.linalg.norm(a - b) / np.linalg.norm(b)
print(f"loom run: cuda (bf16) vs cpu (f32) output relative error {e:.2e} (bf16 tolerance 2e-2): {'ok' if e <= 2e-2 else 'FAILED'}")
PY
cat $w/*.txt | grep -E "^loom: device" | sort | uniq -c
