"""LoRA vs full UNet fine-tuning, and the gain of latent + text caching, on SD-v1-shaped models.

One run measures, on the same UNet (random weights, fp32) and the same batch:
  full      every UNet weight trained (AdamW), inputs already cached (latents + text context)
  lora      rank-8 LoRA on the attention projections (AdamW on the adapter only), inputs cached
  uncached  the same LoRA step, but making the images (the shapes renderer), encoding them with the VAE
            and the prompts with the text encoder at every step (what latent + text caching removes)
``--model sd15`` (default): SD v1.5-shaped UNet, SD kl-f8 VAE, CLIP ViT-L/14; ``--model embedded``: the
demo's small UNet, f=4 VAE and tiny CLIP (what ``experiment=lora_finetune`` trains).
Each variant runs in its own process so its peak resident memory (ru_maxrss) is its own.

    python benchmarks/lora_step.py                       # 64 px images (8x8 latents), batch 2, 4 steps
    python benchmarks/lora_step.py --resolution 128 --batch 1 --steps 3
    python benchmarks/lora_step.py --model embedded --resolution 64 --batch 16 --steps 10
    python benchmarks/lora_step.py --model embedded --algo all    # lora / locon / loha / lokr / dora
``--algo``: the adapter step per algorithm at comparable sizes (``ALGO_SETTINGS``) instead, with the size of
the file each exports (fp32; kohya layout for lora / locon, LyCORIS for the others).
On a GPU (``--device cuda``) peak memory is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.utils.threads import thread_env

os.environ.update(thread_env())  # before torch loads OpenMP (docs/scale.md: Threads)

from ldm.utils.task import run_main


def build(config_path: str, **overrides):
    import hydra
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "conf/model" / f"{config_path}.yaml")
    cfg.update(overrides)
    return hydra.utils.instantiate(cfg)


# Per algorithm, on the attention projections (locon: + the ResBlock / sampling convs): ranks chosen so the
# trainable counts are comparable (LoHa's 4 factors at rank 4 = LoRA's 2 at rank 8; LoKr is smaller by
# design).
ALGO_SETTINGS = {
    "lora": {"rank": 8, "alpha": 8},
    "locon": {"rank": 8, "alpha": 8, "conv_rank": 4, "conv_alpha": 4},
    "loha": {"rank": 4, "alpha": 4},
    "lokr": {"rank": 8, "alpha": 8, "factor": 4, "full_matrix": True},
    "dora": {"rank": 8, "alpha": 8},
}


def attach_adapter(unet, algo: str) -> tuple[list, int]:
    """``algo`` adapters (``ALGO_SETTINGS``) on ``unet``; (their parameters, the exported file's bytes)."""
    import tempfile

    from ldm.io.kohya_lora import save_kohya_lora
    from ldm.io.lycoris_lora import save_lycoris_lora
    from ldm.modules.adapters.algorithms import adapter_factory
    from ldm.modules.adapters.lora import UNET_ATTENTION, UNET_CONV, inject_lora, lora_parameters

    targets = UNET_ATTENTION + (UNET_CONV if algo == "locon" else ())
    inject_lora(unet, targets, factory=adapter_factory(algo, **ALGO_SETTINGS[algo]))
    save = save_kohya_lora if algo in ("lora", "locon") else save_lycoris_lora
    with tempfile.TemporaryDirectory() as tmp:
        size = save(Path(tmp) / "adapter.safetensors", unet).stat().st_size
    return lora_parameters(unet), size


def run_variant(
    variant: str, model: str, resolution: int, batch: int, steps: int, device: str, algo: str | None = None
) -> dict:
    import torch

    from datamodules.shapes import ShapesDataset
    from ldm.diffusion import DiffusionLoss, DiffusionSchedule
    from ldm.modules.adapters.lora import UNET_ATTENTION, inject_lora, lora_parameters

    torch.manual_seed(0)
    sd = model == "sd15"
    unet = build("unet/sd15" if sd else "unet/small").to(device)
    with torch.no_grad():  # non-zero outputs so the backward is not trivially sparse
        for p in unet.parameters():
            p.normal_(0, 0.02)
    file_bytes = 0
    if variant == "full":
        params = list(unet.parameters())
    elif algo:
        params, file_bytes = attach_adapter(unet, algo)
    else:
        inject_lora(unet, UNET_ATTENTION, rank=8, alpha=8)
        params = lora_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    schedule = DiffusionSchedule.from_config()
    latent = resolution // (8 if sd else 4)
    tokens, width = (77, 768) if sd else (20, 64)
    cached_z = torch.randn(batch, 4, latent, latent, device=device)
    cached_ctx = torch.randn(batch, tokens, width, device=device)
    if variant == "uncached":
        from ldm.modules.text_encoder import CLIPTextEncoder

        vae = (
            build("vae/sd" if sd else "vae/f4", resolution=resolution).to(device).requires_grad_(False).eval()
        )
        text = CLIPTextEncoder.from_config("vit_l_14") if sd else CLIPTextEncoder.tiny()
        text = text.to(device)
        data = ShapesDataset(10_000, resolution)  # what a step without caches also pays: making the images
        ids = torch.randint(0, 49407, (batch, tokens), device=device)

    def step():
        if variant == "uncached":
            items = [data[int(i)] for i in torch.randint(0, len(data), (batch,))]
            images = torch.stack([it["image"] for it in items]).to(device)
            with torch.no_grad():
                z = vae.encode(images).sample() * 0.18215
                ctx = text.encode_ids(ids) if sd else text([it["caption"] for it in items])
        else:
            z, ctx = cached_z, cached_ctx
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(z)
        out = unet(schedule.q_sample(z, t, noise), t, ctx)
        loss = DiffusionLoss("eps")(out, z, noise, t, schedule)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    step()  # warm-up (allocates optimiser state)
    times, cpu_times = [], []
    for _ in range(steps):
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)  # CPU seconds: steadier on a shared machine
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {
        "variant": algo or variant,
        "file_bytes": file_bytes,
        "median_s": statistics.median(times),
        "median_cpu_s": statistics.median(cpu_times),
        "peak_gib": peak,
        "trainable": sum(p.numel() for p in params),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="sd15",
        choices=["sd15", "embedded"],
        help="sd15: SD v1.5-shaped UNet, SD VAE, CLIP ViT-L/14 (random weights); embedded: the demo's "
        "small UNet, f=4 VAE and tiny CLIP",
    )
    p.add_argument("--resolution", type=int, default=64, help="image size")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--algo", choices=["all", *ALGO_SETTINGS], help="time the adapter algorithms (all, or one) instead"
    )
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        algo = None if args.algo in (None, "all") else args.algo
        run = run_variant(
            args.variant, args.model, args.resolution, args.batch, args.steps, args.device, algo
        )
        print(json.dumps(run))
        return
    if args.algo:
        compare_algos(args)
        return
    results = {}
    for variant in ("full", "lora", "uncached"):
        results[variant] = measure(variant, args)
        print(f"  {variant}: {results[variant]}", file=sys.stderr)
    report(results, args)


def measure(variant: str, args, algo: str | None = None) -> dict:
    """``run_variant`` in a fresh process (its own peak memory)."""
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--model",
        args.model,
        "--resolution",
        str(args.resolution),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        *(["--algo", algo] if algo else []),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def compare_algos(args) -> None:
    algos = list(ALGO_SETTINGS) if args.algo == "all" else [args.algo]
    rows = []
    for algo in algos:
        rows.append(measure("lora", args, algo))
        print(f"  {algo}: {rows[-1]}", file=sys.stderr)
    print(
        f"\n{args.model} UNet, {args.resolution} px images, batch {args.batch}, fp32, {args.device}, "
        f"median of {args.steps} steps\n"
    )
    print("| algo | settings | trainable params | file (KiB) | step (s) | step CPU (s) | peak memory (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in ALGO_SETTINGS[r["variant"]].items())
        print(
            f"| {r['variant']} | {settings} | {r['trainable'] / 1e3:.1f} k | {r['file_bytes'] / 1024:.0f} | "
            f"{r['median_s']:.3f} | {r['median_cpu_s']:.3f} | {r['peak_gib']:.2f} |"
        )


def report(results: dict, args) -> None:
    full, lora, uncached = results["full"], results["lora"], results["uncached"]
    what = "SD v1.5-shaped UNet, SD VAE, CLIP ViT-L/14" if args.model == "sd15" else "embedded demo models"
    print(
        f"\n{what}, {args.resolution} px images, batch {args.batch}, fp32, {args.device}, "
        f"median of {args.steps} steps\n"
    )
    print("| variant | trainable params | step (s) | peak memory (GiB) |")
    print("|---|---|---|---|")
    for r in (full, lora, uncached):
        print(
            f"| {r['variant']} | {r['trainable'] / 1e6:.1f} M | {r['median_s']:.3f} | {r['peak_gib']:.2f} |"
        )
    print(
        f"\nLoRA / full: time {lora['median_s'] / full['median_s']:.2f} (target <= 0.75), "
        f"peak memory {lora['peak_gib'] / full['peak_gib']:.2f} (target <= 0.60)"
    )
    print(
        f"caching gain (uncached / cached LoRA step): {uncached['median_s'] / lora['median_s']:.2f}x "
        "(target >= 2x)"
    )


if __name__ == "__main__":
    run_main(main)
