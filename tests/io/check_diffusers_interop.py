"""diffusers itself loads the LoRA files `loom convert` writes and reproduces loom's outputs.

Usage: check_diffusers_interop.py LOOM_BINARY WORK_DIR

A tiny UNet2DConditionModel (random weights, SD-like block types) is the base. Its block
down_blocks.0.attentions.0 is saved as a loom model directory; a PEFT-format LoRA for that block
(per-module rank and alpha, a 1x1-conv proj_in, three text-encoder modules) is written here. loom runs the block with the LoRA
(`loom run --prefix`), then converts the LoRA with `--to diffusers`, `--to kohya` and
`--to kohya --sgm`. Each converted file is loaded by diffusers' own loader
(StableDiffusionLoraLoaderMixin.lora_state_dict + load_lora_into_unet, what load_lora_weights does)
into a copy of the UNet, whose block then runs in f64 on the CPU: its output must equal loom's (f32)
within 1e-5 relative, and differ from the base output (the LoRA does something); diffusers must
find the three text-encoder modules in each file too.
Prints 'N passed, M failed' and exits non-zero on any failure.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file

from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader

BLOCK = "down_blocks.0.attentions.0"


def tiny_unet():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=6, attention_head_dim=2, norm_num_groups=4)
    with torch.no_grad():  # diffusers zero-initialises some outputs: make every weight count
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return unet.eval()


def peft_lora(block, gen):
    """A PEFT-spelled LoRA for the block: rank 2 (3 for attn2.to_k), lora_alpha 3 (5 for attn1.to_v)."""
    tensors, ranks, alphas = {}, {}, {}
    for name, module in block.named_modules():
        if not name.endswith(("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2")):
            continue
        full = f"{BLOCK}.{name}"
        r = 3 if name.endswith("attn2.to_k") else 2
        if r != 2:
            ranks[full] = r
        if name.endswith("attn1.to_v"):
            alphas[full] = 5.0
        w = module.weight
        down = torch.randn((r,) + tuple(w.shape[1:2]) + tuple(w.shape[2:]), generator=gen) * 0.5
        up = torch.randn((w.shape[0], r) + tuple(w.shape[2:]), generator=gen) * 0.5
        tensors[f"unet.{full}.lora_A.weight"] = down.float().contiguous()
        tensors[f"unet.{full}.lora_B.weight"] = up.float().contiguous()
    for name in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1"):  # text-encoder modules ride along
        te = f"text_encoder.text_model.encoder.layers.0.{name}"
        tensors[f"{te}.lora_A.weight"] = (torch.randn(2, 8, generator=gen) * 0.5).float()
        tensors[f"{te}.lora_B.weight"] = (torch.randn(8, 2, generator=gen) * 0.5).float()
    meta = {"unet.r": 2, "unet.lora_alpha": 3.0, "unet.rank_pattern": ranks, "unet.alpha_pattern": alphas,
            "unet.use_rslora": False}
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta)}


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p.stdout + p.stderr


def block_output(unet, x, ctx):
    block = unet.down_blocks[0].attentions[0].double()
    with torch.no_grad():
        return block(torch.from_numpy(x).double(), encoder_hidden_states=torch.from_numpy(ctx).double()).sample.numpy()


def main():
    loom, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    unet = tiny_unet()
    block = unet.down_blocks[0].attentions[0]

    # The block as a loom model directory, as diffusers' save_pretrained writes it (config.json and
    # bare keys: transformer_blocks.0.…); --prefix then places it in the UNet for the adapter's keys.
    model_dir = os.path.join(work, "model")
    block.save_pretrained(model_dir, safe_serialization=True)

    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 8, 4, 4, generator=gen)).numpy().astype(np.float32)
    ctx = (torch.randn(2, 5, 6, generator=gen)).numpy().astype(np.float32)
    save_np({"hidden_states": x, "encoder_hidden_states": ctx}, os.path.join(work, "input.safetensors"))
    tensors, meta = peft_lora(block, gen)
    peft_path = os.path.join(work, "lora_peft.safetensors")
    save_file(tensors, peft_path, metadata=meta)

    out_path = os.path.join(work, "loom_output.safetensors")
    run([loom, "run", "--model", model_dir, "--input", os.path.join(work, "input.safetensors"), "--output", out_path,
         "--adapter", peft_path, "--prefix", BLOCK])
    loom_out = load_np(out_path)["output"].astype(np.float64)
    base_out = block_output(copy.deepcopy(unet), x, ctx)

    passed = failed = 0
    for name, args in (("diffusers", ["--to", "diffusers"]), ("kohya", ["--to", "kohya"]),
                       ("kohya-sgm", ["--to", "kohya", "--sgm"])):
        path = os.path.join(work, f"lora_{name}.safetensors")
        print(run([loom, "convert", peft_path, path] + args).strip())
        try:
            u = copy.deepcopy(unet)
            state, alphas = Loader.lora_state_dict(path, unet_config=u.config)
            te_keys = [k for k in state if k.startswith("text_encoder.") and k.endswith(("down.weight", "lora_A.weight"))]
            if len(te_keys) != 3:
                raise RuntimeError(f"diffusers found {len(te_keys)} text-encoder LoRA modules, not 3: {te_keys}")
            Loader.load_lora_into_unet(state, alphas, unet=u)
            got = block_output(u, x, ctx)
            err = np.linalg.norm(got - loom_out) / np.linalg.norm(loom_out)
            change = np.linalg.norm(base_out - loom_out) / np.linalg.norm(loom_out)
            ok = err <= 1e-5 and change > 1e-2
            print(f"{name}: diffusers vs loom relative error {err:.2e} (the LoRA changes the output by {change:.2e})"
                  f" {'ok' if ok else 'FAIL'}")
        except Exception as e:  # noqa: BLE001 - a load diffusers refuses is a failure to report
            ok = False
            print(f"{name}: diffusers could not load loom's file: {type(e).__name__}: {e}")
        passed, failed = passed + ok, failed + (not ok)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
