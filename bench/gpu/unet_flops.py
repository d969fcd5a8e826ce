"""FLOPs of one UNet forward per latent for the benchmark configs (bench/gpu/configs), counted by
PyTorch's FlopCounterMode on the meta device (no weights, no GPU): the arithmetic a guided sampling
step (the UNet on 2N latents) or a forward must do, against which a measured time gives TFLOP/s.
    python3 bench/gpu/unet_flops.py
"""
import json
import os

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = [("sd15", 64, 768, False), ("sdxl", 128, 2048, True)]  # name, latent side, context width, text_time

for name, side, ctx, text_time in CONFIGS:
    cfg = json.load(open(os.path.join(HERE, "configs", f"{name}_unet.json")))
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(cfg)
        x, t, c = torch.randn(1, 4, side, side), torch.tensor([500]), torch.randn(1, 77, ctx)
        extra = {}
        if text_time:
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, t, c, **extra)
    parts = {str(k).replace("aten.", ""): round(v / 1e12, 3) for k, v in counter.get_flop_counts()["Global"].items()}
    print(json.dumps({"config": name, "latent": side, "tflop_per_latent_forward": round(counter.get_total_flops() / 1e12, 3),
                      "by_op_tflop": parts}))
