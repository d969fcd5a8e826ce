#!/usr/bin/env bash
# Nsight Compute on the flash kernels (the H200 machine has ncu): where a kernel's warps stall.
#   bash bench/gpu/ncu_flash.sh OUT_DIR [B,H,Q,K,d]...   (default: the two big shapes)
# Per shape and kernel family (forward, backward): one launch profiled with the speed-of-light,
# occupancy and warp-state sections, and the stall reasons as raw metrics (warps stalled per issued
# instruction, largest first). Writes OUT_DIR/ncu_<kernel>_<shape>.txt (no commas in file names:
# the device's file transfer refuses them) and prints the summary lines.
set -uo pipefail
out=${1:-out}
shift || true
shapes=("$@")
[ ${#shapes[@]} -eq 0 ] && shapes=(2,8,4096,4096,40 2,8,4096,4096,64)
bench=./build-gpu/bench/loom_bench_flash
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
mkdir -p "$out"
for s in "${shapes[@]}"; do
  for k in flash_fwd flash_bwd; do
    f="$out/ncu_${k}_${s//,/x}.txt"
    timeout 200 "$ncu" --kernel-name "regex:${k}" --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      "$bench" --reps 1 --shape "$s" >"$f" 2>&1
    echo "== $k $s (rc=$?)"
    grep -E "^  [a-z_]+.*kernel|Duration|Compute \(SM\) Throughput|L2 Cache Throughput|Issued Warp Per Scheduler|Eligible Warps|Active Warps Per Scheduler|Warp Cycles Per Issued" "$f" | head -12
    grep -E "smsp__average_warps_issue_stalled_" "$f" | awk '{print $NF, $1}' | sort -rn | head -8
  done
done
