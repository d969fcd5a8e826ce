"""How three projections of one input (an attention's to_q, to_k, to_v) run on this GPU through
cuBLAS (PyTorch's matmul): three GEMMs, one strided-batched GEMM with the input shared (batch
stride 0), one GEMM on the concatenated weight. bf16, shapes of the SD UNets at 2N = 8 latents.
Prints one JSON line per shape: ms of each way and the TFLOP/s of the three separate GEMMs."""
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from cuda_timing import time_ms  # noqa: E402

SHAPES = [(32768, 640), (8192, 1280), (32768, 320), (8192, 640), (2048, 1280)]


def main():
    torch.manual_seed(0)
    for t, c in SHAPES:
        x = torch.randn(t, c, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(c, c, device="cuda", dtype=torch.bfloat16) / c**0.5 for _ in range(3)]
        w3 = torch.stack(ws)  # (3, out, in)
        wcat = torch.cat(ws)  # (3·out, in)
        sep = time_ms(lambda: [x @ w.t() for w in ws], 50)
        bat = time_ms(lambda: torch.matmul(x.unsqueeze(0).expand(3, t, c), w3.transpose(1, 2)), 50)
        cat = time_ms(lambda: x @ wcat.t(), 50)
        flop = 3 * 2 * t * c * c
        print(json.dumps({"tokens": t, "channels": c, "separate_ms": round(sep, 4), "batched_ms": round(bat, 4),
                          "concatenated_ms": round(cat, 4), "separate_tflops": round(flop / sep / 1e9, 1),
                          "batched_tflops": round(flop / bat / 1e9, 1)}), flush=True)


if __name__ == "__main__":
    main()
