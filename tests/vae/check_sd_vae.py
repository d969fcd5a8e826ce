#!/usr/bin/env python3
"""Manual check (not part of ctest; needs torch + diffusers): Stable Diffusion's real VAE config
(block_out_channels 128/256/512/512, 32 groups, a 512-channel mid-block attention) with random
weights, `loom decode` and `loom encode` against diffusers on the same files.

    python3 tests/vae/check_sd_vae.py --loom build/examples/loom [--device cuda] [--size 64x96] [--dir /tmp/sdvae]

Prints the largest pixel difference of the decoded PNG (expect ≤ 1 level on a few pixels) and the
relative error of the encoded latents (expect ≤ 1e-4 in f32). On the CPU at 64x96 it takes about a
minute; on 2 shared cores.
"""
import argparse
import os
import subprocess

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL
from safetensors.numpy import load_file
from safetensors.torch import save_file

p = argparse.ArgumentParser()
p.add_argument("--loom", required=True)
p.add_argument("--device", default="cpu")
p.add_argument("--size", default="64x96", help="HxW of the image, multiples of 8")
p.add_argument("--dir", default="/tmp/loom_sd_vae_check")
a = p.parse_args()
h, w = (int(v) for v in a.size.split("x"))
os.makedirs(a.dir, exist_ok=True)
torch.manual_seed(0)
cfg = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
vae = AutoencoderKL(**cfg).eval()
vae.save_pretrained(os.path.join(a.dir, "vae"))
latents = torch.randn(1, 4, h // 8, w // 8)
save_file({"latents": latents}, os.path.join(a.dir, "lat.safetensors"))
image = np.random.RandomState(0).randint(0, 256, (h, w, 3)).astype("uint8")
PIL.Image.fromarray(image).save(os.path.join(a.dir, "in.png"))
with torch.no_grad():
    decoded = vae.decode(latents / cfg["scaling_factor"]).sample
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    encoded = (vae.encode(x).latent_dist.mean * cfg["scaling_factor"]).numpy()
pixels = ((decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")[0]

run = lambda *args: subprocess.run([a.loom, *args, "--device", a.device], check=True)
run("decode", "--vae", os.path.join(a.dir, "vae"), "--input", os.path.join(a.dir, "lat.safetensors"),
    "--out", os.path.join(a.dir, "out"))
run("encode", "--vae", os.path.join(a.dir, "vae"), "--images", os.path.join(a.dir, "in.png"),
    "--out", os.path.join(a.dir, "enc.safetensors"))
got = np.array(PIL.Image.open(os.path.join(a.dir, "out", "lat_0.png"))).astype(int)
diff = np.abs(got - pixels.astype(int))
print(f"decode: max pixel difference {diff.max()}, {(diff > 0).mean():.2e} of the bytes differ")
enc = load_file(os.path.join(a.dir, "enc.safetensors"))["latents"]
print(f"encode: relative error {np.abs(enc - encoded).max() / np.abs(encoded).max():.2e}")
