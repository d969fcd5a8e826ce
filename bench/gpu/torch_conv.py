"""PyTorch's convolution (cuDNN) at the shapes of bench/gpu/bench_conv.cpp, in the same call on the
same GPU: torch.nn.functional.conv2d with bias ("fwd", under no_grad), the gradient w.r.t. the
input alone ("bwd_input", torch.nn.grad.conv2d_input: cuDNN's backward-data) and w.r.t. the weight
("bwd_weight", torch.nn.grad.conv2d_weight: cuDNN's backward-filter), bf16 (or --dtype
f16), channels-first (NCHW) like loom; median of --reps after 5 warm-ups, CUDA events; peak memory
(torch.cuda.max_memory_allocated) of the timed calls above what was held before. One JSON line per
row (--json, the format of loom_bench_conv) or a table."""
import argparse, json, torch
import torch.nn.functional as F
from cuda_timing import time_ms  # bench/gpu/cuda_timing.py (this script's directory)

# name, N, C, O, H, W, kernel, stride (padding kernel // 2): as bench_conv.cpp's kShapes
SHAPES = [("sdxl_320_128", 4, 320, 320, 128, 128, 3, 1), ("sdxl_640_64", 4, 640, 640, 64, 64, 3, 1),
          ("sdxl_1280_32", 4, 1280, 1280, 32, 32, 3, 1), ("sdxl_960to320_128", 4, 960, 320, 128, 128, 3, 1),
          ("sdxl_960to320_1x1", 4, 960, 320, 128, 128, 1, 1), ("sdxl_down_320_s2", 4, 320, 320, 128, 128, 3, 2),
          ("sdxl_conv_in_4", 4, 4, 320, 128, 128, 3, 1), ("sd15_320_64", 4, 320, 320, 64, 64, 3, 1),
          ("sd15_640_32", 4, 640, 640, 32, 32, 3, 1), ("sd15_1280_16", 4, 1280, 1280, 16, 16, 3, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", choices=["bf16", "f16"], default="bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm in the warm-ups
    if not args.json:
        print(f"{'impl':<12} {'name':<20} {'pass':<10} {'ms':>10} {'TFLOP/s':>9} {'peak MB':>10}")
    for (name, n, c, o, h, w, k, s) in SHAPES:
        pad = k // 2
        x = torch.randn(n, c, h, w, device="cuda", dtype=dt)
        wt = torch.randn(o, c, k, k, device="cuda", dtype=dt)
        b = torch.randn(o, device="cuda", dtype=dt)
        oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
        dy = torch.randn(n, o, oh, ow, device="cuda", dtype=dt)
        flops = 2.0 * n * o * oh * ow * c * k * k
        for pass_ in ("fwd", "bwd_input", "bwd_weight"):
            def run():
                with torch.no_grad():
                    if pass_ == "bwd_input":
                        torch.nn.grad.conv2d_input(x.shape, wt, dy, stride=s, padding=pad)
                    elif pass_ == "bwd_weight":
                        torch.nn.grad.conv2d_weight(x, wt.shape, dy, stride=s, padding=pad)
                    else:
                        F.conv2d(x, wt, b, stride=s, padding=pad)
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = time_ms(run, args.reps)
            peak = (torch.cuda.max_memory_allocated() - base) / 1e6
            row = dict(impl="torch_cudnn", dtype=args.dtype, name=name, shape=f"{n},{c},{h},{w},{o},{k},{s}",
                       **{"pass": pass_}, ms=round(ms, 4),
                       tflops=round(flops / (ms * 1e-3) / 1e12, 1), peak_mb=round(peak, 1))
            print(json.dumps(row) if args.json else
                  f"{row['impl']:<12} {name:<20} {row['pass']:<10} {ms:10.4f} {row['tflops']:9.1f} {peak:10.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
