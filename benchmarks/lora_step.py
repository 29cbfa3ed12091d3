"""LoRA vs full UNet fine-tuning, and the gain of latent + text caching, on SD-v1-shaped models.

One run measures, on the same SD v1.5-shaped UNet (random weights, fp32) and the same batch:
  full      every UNet weight trained (AdamW), inputs already cached (latents + text context)
  lora      rank-8 LoRA on the attention projections (AdamW on the adapter only), inputs cached
  uncached  the same LoRA step, but encoding the images with the SD VAE and the prompts with the
            CLIP ViT-L/14 text encoder at every step (what latent + text caching removes)
Each variant runs in its own process so its peak resident memory (ru_maxrss) is its own.

    python benchmarks/lora_step.py                       # 64 px images (8x8 latents), batch 2, 4 steps
    python benchmarks/lora_step.py --resolution 128 --batch 1 --steps 3
On a GPU (``--device cuda``) peak memory is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_unet():
    from omegaconf import OmegaConf

    from ldm.modules.unet import UNetModel

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/unet/sd15.yaml"))
    cfg.pop("_target_")
    return UNetModel(**cfg)


def run_variant(variant: str, resolution: int, batch: int, steps: int, device: str) -> dict:
    import torch

    from ldm.diffusion import DiffusionSchedule, diffusion_loss
    from ldm.modules.adapters.lora import UNET_ATTENTION, inject_lora, lora_parameters

    torch.manual_seed(0)
    unet = build_unet().to(device)
    with torch.no_grad():  # non-zero outputs so the backward is not trivially sparse
        for p in unet.parameters():
            p.normal_(0, 0.02)
    if variant == "full":
        params = list(unet.parameters())
    else:
        inject_lora(unet, UNET_ATTENTION, rank=8, alpha=8)
        params = lora_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    schedule = DiffusionSchedule.from_config()
    latent = resolution // 8
    images = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    cached_z = torch.randn(batch, 4, latent, latent, device=device)
    cached_ctx = torch.randn(batch, 77, 768, device=device)
    vae = text = None
    if variant == "uncached":
        from ldm.modules.text_encoder import CLIPTextEncoder
        from ldm.modules.vae import AutoencoderKL

        vae = AutoencoderKL(embed_dim=4, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                            resolution=resolution).to(device).requires_grad_(False).eval()
        text = CLIPTextEncoder.from_config("vit_l_14").to(device)
        ids = torch.randint(0, 49407, (batch, 77), device=device)

    def step():
        if variant == "uncached":
            with torch.no_grad():
                z = vae.encode(images).sample() * 0.18215
                ctx = text.encode_ids(ids)
        else:
            z, ctx = cached_z, cached_ctx
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(z)
        out = unet(schedule.q_sample(z, t, noise), t, ctx)
        loss = diffusion_loss(out, noise, t, schedule)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up (allocates optimiser state)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"variant": variant, "median_s": statistics.median(times), "peak_gib": peak,
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64, help="image size (latents are size/8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.resolution, args.batch, args.steps, args.device)))
        return
    results = {}
    for variant in ("full", "lora", "uncached"):
        cmd = [sys.executable, __file__, "--variant", variant, "--resolution", str(args.resolution),
               "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
        print(f"  {variant}: {results[variant]}", file=sys.stderr)
    full, lora, uncached = results["full"], results["lora"], results["uncached"]
    print(f"\nSD v1.5-shaped UNet, {args.resolution} px ({args.resolution // 8}x{args.resolution // 8} latents), "
          f"batch {args.batch}, fp32, {args.device}, median of {args.steps} steps\n")
    print("| variant | trainable params | step (s) | peak memory (GiB) |")
    print("|---|---|---|---|")
    for r in (full, lora, uncached):
        print(f"| {r['variant']} | {r['trainable'] / 1e6:.1f} M | {r['median_s']:.3f} | {r['peak_gib']:.2f} |")
    print(f"\nLoRA / full: time {lora['median_s'] / full['median_s']:.2f} (target <= 0.75), "
          f"peak memory {lora['peak_gib'] / full['peak_gib']:.2f} (target <= 0.60)")
    print(f"caching gain (uncached / cached LoRA step): {uncached['median_s'] / lora['median_s']:.2f}x "
          "(target >= 2x)")


if __name__ == "__main__":
    main()
