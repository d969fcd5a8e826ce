"""diffusers + PEFT on the whole UNet, at the shapes of bench/gpu/bench_unet.cpp, in the same call on
the same GPU: a LoRA training step with the diffusion objective (r4 α4 on to_q/to_k/to_v/to_out.0,
AdamW, epsilon loss; frozen UNet in bf16, LoRA f32, bf16 autocast, as train_text_to_image_lora.py
runs it), the inference forward, and a guided sampling step (the UNet on 2N), then the forward and
the guided step again with the LoRA merged into the weights (forward_fused_ms,
cfg_sample_step_fused_ms: PEFT's merge, as pipe.fuse_lora()). Random weights of the
config given. Median of --reps after warm-ups, CUDA events; peak memory. One JSON line."""
import argparse, json, torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from cuda_timing import time_ms  # bench/gpu/cuda_timing.py (this script's directory)



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--name", default="unet")
    args = ap.parse_args()
    cfg = json.load(open(args.config))
    cfg.pop("_class_name", None)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg)
    unet.requires_grad_(False)
    unet.to("cuda", dtype=torch.bfloat16)
    unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]), unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    n, side = args.batch, cfg.get("sample_size", 64)
    cross = cfg["cross_attention_dim"]
    text_time = cfg.get("addition_embed_type") == "text_time"

    def inputs(m):
        ctx = torch.randn(m, 77, cross, device="cuda")
        extra = None
        if text_time:
            d = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            extra = {"text_embeds": torch.randn(m, d, device="cuda"), "time_ids": torch.full((m, 6), 1024.0, device="cuda")}
        return ctx, extra

    latents = torch.randn(n, 4, side, side, device="cuda")
    ctx, extra = inputs(n)

    def step():
        opt.zero_grad(set_to_none=True)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (n,), device="cuda").long()
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = unet(noisy, t, ctx, added_cond_kwargs=extra).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()

    unet.train()
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() / 1e9
    step_ms = time_ms(step, args.reps)
    step_peak = torch.cuda.max_memory_allocated() / 1e9
    unet.eval()
    x = torch.randn(n, 4, side, side, device="cuda")

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            unet(x, 500, ctx, added_cond_kwargs=extra)
    torch.cuda.reset_peak_memory_stats()
    fwd_ms = time_ms(fwd, args.reps)
    fwd_peak = torch.cuda.max_memory_allocated() / 1e9
    ctx2, extra2 = inputs(2 * n)

    def sample_step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            y = unet(torch.cat([x, x]), 500, ctx2, added_cond_kwargs=extra2).sample
            u, c = y.chunk(2)
            return u + 7.5 * (c - u)
    sample_ms = time_ms(sample_step, args.reps)
    # the LoRA merged into the weights (PEFT's merge, what pipe.fuse_lora() does): the forward and
    # the guided step again
    from peft.tuners.lora import LoraLayer
    for m in unet.modules():
        if isinstance(m, LoraLayer):
            m.merge()
    fwd_fused_ms = time_ms(fwd, args.reps)
    sample_fused_ms = time_ms(sample_step, args.reps)
    print(json.dumps(dict(impl="diffusers+peft", config=args.name, batch=n, precision="bf16",
                          step_ms=round(step_ms, 3), step_peak_gb=round(step_peak, 3), forward_ms=round(fwd_ms, 3),
                          forward_peak_gb=round(fwd_peak, 3), cfg_sample_step_ms=round(sample_ms, 3),
                          forward_fused_ms=round(fwd_fused_ms, 3), cfg_sample_step_fused_ms=round(sample_fused_ms, 3),
                          weights_gb=round(weights, 3))), flush=True)


if __name__ == "__main__":
    main()
