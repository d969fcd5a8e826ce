#!/usr/bin/env bash
# Where a step's GPU time goes: Nsight Systems' kernel summary (when nsys is on the machine) of
# loom's whole-UNet step (SDXL, batch 4) and SD 1.5 block step (bf16). Writes $out/prof_*.txt.
out=${1:-out}
nsys=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
if [ -z "$nsys" ]; then echo "profile: no nsys on this machine"; ls /opt/nvidia /usr/local/cuda/bin 2>&1 | head -40; exit 0; fi
prof() {  # name, command...
  local name=$1; shift
  "$nsys" profile -q -t cuda -o "$out/$name" --force-overwrite true "$@" >/dev/null 2>&1
  "$nsys" stats -q --report cuda_gpu_kern_sum --format csv "$out/$name.nsys-rep" 2>/dev/null \
    | python3 -c '
import csv, sys
rows = list(csv.DictReader(sys.stdin))
tot = sum(float(r["Total Time (ns)"]) for r in rows)
print(f"total kernel time {tot/1e6:.1f} ms over {sum(int(r["Instances"]) for r in rows)} launches")
for r in rows[:25]:
    print(f"{float(r["Time (%)"]):5.1f}%  {float(r["Total Time (ns)"])/1e6:8.2f} ms  {int(r["Instances"]):6d}x  {r["Name"][:110]}")
' | tee "$out/prof_$name.txt"
  rm -f "$out/$name.nsys-rep" "$out/$name.sqlite"
}
prof unet_sdxl_b4 ./build-gpu/bench/loom_bench_unet --config bench/gpu/configs/sdxl_unet.json --name sdxl --batch 4 --reps 3
prof unet_sd15_b4 ./build-gpu/bench/loom_bench_unet --config bench/gpu/configs/sd15_unet.json --name sd15 --batch 4 --reps 3
prof block_sd15_bf16 ./build-gpu/bench/loom_bench_step --config sd15 --precision bf16 --reps 20
prof block_sd15_f32 ./build-gpu/bench/loom_bench_step --config sd15 --precision f32 --reps 20
