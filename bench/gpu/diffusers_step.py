"""diffusers + PEFT at the shapes of bench/gpu/bench_step.cpp, in the same call on the same GPU: a
LoRA training step (r4 α4 on to_q/to_k/to_v/to_out.0, AdamW, MSE) and the forward of a
Transformer2DModel, f32 and bf16 (autocast, LoRA f32, as diffusers' training scripts run it).
Median of --reps after 5 warm-ups, CUDA events; peak memory. One JSON line per row."""
import argparse, json, torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from cuda_timing import time_ms  # bench/gpu/cuda_timing.py (this script's directory)



def run(config, precision, reps):
    torch.manual_seed(0)
    if config == "sdxl":
        m = Transformer2DModel(num_attention_heads=10, attention_head_dim=64, in_channels=640, num_layers=2,
                               cross_attention_dim=2048, use_linear_projection=True)
        ch, cd = 640, 2048
    else:
        m = Transformer2DModel(num_attention_heads=8, attention_head_dim=40, in_channels=320, cross_attention_dim=768)
        ch, cd = 320, 768
    m.requires_grad_(False)
    wdt = torch.bfloat16 if precision == "bf16" else torch.float32
    m.to("cuda", dtype=wdt)
    m = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]), m)
    params = [p for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(2, ch, 64, 64, device="cuda")
    ctx = torch.randn(2, 77, cd, device="cuda")
    target = torch.randn(2, ch, 64, 64, device="cuda")
    if precision == "f32":
        torch.backends.cuda.matmul.allow_tf32 = False
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = m(x, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(y.float(), target)
        loss.backward()
        opt.step()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    step_ms = time_ms(step, reps)
    step_peak = torch.cuda.max_memory_allocated() / 1e9
    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            m(x, encoder_hidden_states=ctx)
    torch.cuda.reset_peak_memory_stats()
    fwd_ms = time_ms(fwd, reps)
    print(json.dumps(dict(impl="diffusers+peft", config=config, precision=precision, step_ms=round(step_ms, 3),
                          step_peak_gb=round(step_peak, 3), forward_ms=round(fwd_ms, 3),
                          forward_peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3))), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    for config in ("sd15", "sdxl"):
        for precision in ("f32", "bf16"):
            run(config, precision, args.reps)
