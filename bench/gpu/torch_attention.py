"""PyTorch's SDPA backends at the shapes of bench/gpu/bench_flash.cpp, in the same call on the
same GPU: flash (FA2), cuDNN, efficient, default; bf16 forward and forward+backward; then f32
with TF32 (torch.backends.cuda.matmul.allow_tf32 = True; efficient, math, default — flash and
cuDNN take no f32) at TF32_SHAPES, the "tf32" rows of loom_bench_flash (--shape B,H,Q,K,d…: those
shapes in bf16 only); median of --reps after 5
warm-ups, CUDA events; peak memory (torch.cuda.max_memory_allocated) of the timed calls. One JSON
line per row (--json) or a table."""
import argparse, json, math, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F
from cuda_timing import time_ms  # bench/gpu/cuda_timing.py (this script's directory)

SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 4096, 64), (2, 10, 4096, 4096, 64), (2, 20, 1024, 1024, 64),
          (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160), (2, 8, 4096, 77, 40), (1, 8, 16384, 16384, 64)]
BACKENDS = {"flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION], "default": None}
TF32_SHAPES = [(2, 8, 4096, 4096, 64), (2, 8, 4096, 4096, 40)]
TF32_BACKENDS = {"efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH], "default": None}



def bench_shape(shape, dt, label, backends, args):
    """Forward and forward+backward of one shape [B, H, S, d] in dtype dt, one row per backend and pass."""
    b, h, q, k, d = shape
    Q = torch.randn(b, h, q, d, device="cuda", dtype=dt)
    K = torch.randn(b, h, k, d, device="cuda", dtype=dt)
    V = torch.randn(b, h, k, d, device="cuda", dtype=dt)
    dO = torch.randn(b, h, q, d, device="cuda", dtype=dt)
    flops = 4.0 * b * h * q * k * d
    for name, be in backends.items():
        for bwd in (False, True):
            def run():
                if not bwd:
                    with torch.no_grad():
                        F.scaled_dot_product_attention(Q, K, V)
                    return
                q_, k_, v_ = (t.detach().requires_grad_() for t in (Q, K, V))
                F.scaled_dot_product_attention(q_, k_, v_).backward(dO)
            try:
                ctx = sdpa_kernel(be) if be else torch.enable_grad()
                with ctx:
                    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    ms = time_ms(run, args.reps)
                    peak = (torch.cuda.max_memory_allocated() - base) / 1e6 + 4 * b * h * (q + k) * d * Q.element_size() / 1e6
            except Exception as e:  # a backend that refuses the shape
                ms, peak = float("nan"), float("nan")
            row = dict(impl="torch_" + name, dtype=label, shape=f"{b},{h},{q},{k},{d}",
                       **{"pass": "fwdbwd" if bwd else "fwd"}, ms=round(ms, 4),
                       tflops=round(flops * (3.5 if bwd else 1) / (ms * 1e-3) / 1e12, 1) if ms == ms else None,
                       peak_mb=round(peak, 1))
            print(json.dumps(row) if args.json else
                  f"{row['impl']:<16} {label:<5} {row['shape']:<22} {row['pass']:<7} {ms:9.3f} ms {row['tflops']} TFLOP/s {peak:9.1f} MB",
                  flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--shape", action="append", default=[],
                    help="B,H,Q,K,d (repeatable): these shapes in bf16 instead of SHAPES, and no tf32 rows")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape]
    if any(len(s) != 5 or min(s) <= 0 for s in shapes):
        ap.error("--shape: expected five positive integers B,H,Q,K,d")
    for shape in shapes or SHAPES:
        bench_shape(shape, torch.bfloat16, "bf16", BACKENDS, args)
    if shapes:
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # f32 SDPA with TF32, as loom's --precision tf32
    try:
        for shape in TF32_SHAPES:
            bench_shape(shape, torch.float32, "tf32", TF32_BACKENDS, args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


if __name__ == "__main__":
    main()
