"""Generate images for prompts from a trained text-to-image checkpoint.

    python sample.py --ckpt logs/txt2img/runs/<run>/checkpoints/last.ckpt \
        --prompt "a red circle on a blue background" --prompt "a green star on a white background" \
        --sampler dpmpp_2m --steps 20 --guidance 3 --seed 0 --n 4 --out samples/

``--ckpt last`` takes the newest txt2img run. ``--ckpt`` also takes any base model ``load_base_model`` reads:
a Stable Diffusion ``.safetensors``/``.ckpt`` single file, a diffusers folder, or a hub id, e.g.

    python sample.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "a photo of a cat" --steps 25 --n 1

(512 px for SD v1, 768 for SD 2.x 768-v). Writes ``grid.png`` (one row per prompt) and single PNGs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from PIL import Image

from ldm.diffusion import build_sampler
from ldm.models.checkpoint import load_lightning_model
from ldm.utils.images import save_grid, to_uint8
from ldm.utils.runs import latest_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="our checkpoint, 'last' for the newest txt2img run, or a Stable "
                   "Diffusion .safetensors/.ckpt, diffusers folder or hub id")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for a Stable Diffusion single file that "
                   "embeds none (default: the released CLIP tokenizer from the Hugging Face cache)")
    p.add_argument("--log-dir", default="logs", help="where 'last' looks for runs (default: logs)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--sampler", default="dpmpp_2m", choices=["dpmpp_2m", "ddim", "ddpm"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the training size)")
    p.add_argument("--lora", action="append", default=[],
                   help="kohya LoRA .safetensors to merge, optionally with a multiplier: file.safetensors:0.8 "
                   "(repeat to stack several)")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw instead of the EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the grid and images of an earlier call "
                   "in --out (default: refuse, so earlier samples are never lost silently)")
    return p.parse_args(argv)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "empty"


def parse_lora(spec: str) -> tuple[str, float]:
    """``file.safetensors`` or ``file.safetensors:0.8`` -> (path, multiplier)."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def load_for_sampling(ckpt: str, device: str = "cpu", use_ema: bool = True, tokenizer: str | None = None,
                      loras: list[str] = (), sampler=None, resolution: int | None = None, log_dir: str = "logs"):
    """A LatentDiffusion ready to ``generate``: our checkpoint ('last' = newest txt2img run) or any base
    ``load_base_model`` reads, with kohya LoRA files merged in (``path[:multiplier]``)."""
    from ldm.io.kohya_lora import load_kohya_lora
    from ldm.io.sources import is_lightning_checkpoint
    from ldm.models.base_loader import latent_diffusion_from_components, load_base_model

    if ckpt == "last":
        found = latest_checkpoint(log_dir, "txt2img")
        if found is None:
            raise SystemExit(f"--ckpt last: no {log_dir}/txt2img/runs/*/checkpoints/last.ckpt; train one first "
                             "(python train.py experiment=txt2img) or pass a path")
        ckpt = str(found)
    if is_lightning_checkpoint(ckpt):
        model = load_lightning_model(ckpt)
        resolution = resolution or int(model.model_config.get("vae", {}).get("resolution", 32))
    else:  # a Stable Diffusion single file, a diffusers folder or a hub id
        components = load_base_model(str(ckpt), use_ema=use_ema, **({"tokenizer": tokenizer} if tokenizer else {}))
        model = latent_diffusion_from_components(components, sampler)
        resolution = resolution or components.resolution
    unet = model.unet_ema.module if use_ema and model.unet_ema is not None else model.unet
    for spec in loras:
        path, multiplier = parse_lora(spec)
        summary = load_kohya_lora(path, unet=unet, text_encoder=model.text_encoder, multiplier=multiplier,
                                  merge=True)
        print(f"merged LoRA {path} x{multiplier} ({summary['modules']} modules, rank {summary['rank']})")
    model.image_resolution = resolution
    return model.to(device).eval()


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse (one actionable line) to write over an earlier call's ``grid.png`` unless asked to."""
    if (out / "grid.png").exists() and not overwrite:
        raise SystemExit(f"error: {out / 'grid.png'} exists (an earlier sample.py call): pass --out <a new "
                         "folder>, or --overwrite to replace it")


def main(argv=None) -> Path:
    args = parse_args(argv)
    check_output_folder(Path(args.out), args.overwrite)
    kwargs = {"eta": args.eta} if args.sampler == "ddim" else {}
    sampler = build_sampler(args.sampler, steps=args.steps, **kwargs)
    model = load_for_sampling(args.ckpt, args.device, not args.no_ema, args.tokenizer, args.lora, sampler,
                              args.resolution, args.log_dir)
    resolution = model.image_resolution
    prompts = [p for p in args.prompt for _ in range(args.n)]
    images = model.generate(prompts, guidance_scale=args.guidance, seed=args.seed, sampler=sampler,
                            negative_prompt=args.negative_prompt, use_ema=not args.no_ema, progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, array) in enumerate(zip(prompts, to_uint8(images))):
        Image.fromarray(array).save(out / f"{i:03d}_{slug(prompt)}.png")
    grid = save_grid(images, out / "grid.png", nrow=args.n, upscale=max(1, 128 // resolution))
    print(f"wrote {len(prompts)} images and {grid}")
    return grid


if __name__ == "__main__":
    main()
