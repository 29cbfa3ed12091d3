"""Generate images for prompts from a trained text-to-image checkpoint.

    python sample.py --ckpt logs/txt2img/runs/<run>/checkpoints/last.ckpt \
        --prompt "a red circle on a blue background" --prompt "a green star on a white background" \
        --sampler dpmpp_2m --steps 20 --guidance 3 --seed 0 --n 4 --out samples/

``--ckpt last`` takes the newest txt2img run. ``--ckpt`` also takes any base model ``load_base_model`` reads:
a Stable Diffusion ``.safetensors``/``.ckpt`` single file, a diffusers folder, or a hub id, e.g.

    python sample.py --ckpt v1-5-pruned-emaonly.safetensors --prompt "a photo of a cat" --steps 25 --n 1

(512 px for SD v1, 768 for SD 2.x 768-v). ``--lora file.safetensors:0.8`` merges LoRA files (kohya or PEFT);
``--embedding file[:token]`` adds textual-inversion tokens; ``--hypernetwork file.pt:0.7`` applies an
AUTOMATIC1111 hypernetwork. Writes ``grid.png`` (one row per prompt) and single PNGs, each with
its generation parameters in the PNG text chunk ``parameters`` (AUTOMATIC1111's format). Image ``i`` draws
its initial latents and then its per-step noise from one generator seeded ``--seed + i``, whatever
``--batch-size`` is: diffusers' image for ``generator=torch.manual_seed(seed + i)``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
from pathlib import Path

from ldm.utils.threads import thread_env

os.environ.update(thread_env())  # before torch loads OpenMP, which reads it once (docs/scale.md: Threads)

import torch
from PIL import Image

from ldm.diffusion import SAMPLERS, build_sampler
from ldm.diffusion.samplers import display_name
from ldm.io.infotext import adapter_fields, format_infotext, model_hash
from ldm.models.micro_conditions import unread_conditions
from ldm.models.pipeline import (
    check_resolution,
    generate_batches,
    load_for_sampling,
    load_init_image,
    parse_lora,
    resolve_last,
)
from ldm.modules.compile import compile_in_place
from ldm.utils.images import make_grid, save_image, to_uint8
from ldm.utils.task import run_main
from ldm.utils.threads import AdaptiveThreads, may_adapt


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--ckpt",
        required=True,
        help="our checkpoint, 'last' for the newest txt2img run, or a Stable "
        "Diffusion .safetensors/.ckpt, diffusers folder or hub id",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder for a Stable Diffusion single file that "
        "embeds none (default: the released CLIP tokenizer from the Hugging Face cache)",
    )
    p.add_argument("--log-dir", default="logs", help="where 'last' looks for runs (default: logs)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument(
        "--negative-prompt",
        action="append",
        default=None,
        help="one for every prompt, or repeat it once per --prompt (in the same order)",
    )
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (bounds memory)")
    p.add_argument("--sampler", default="dpmpp_2m", choices=list(SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--eta", type=float, default=None, help="DDIM eta (default 0) / ancestral noise (default 1)"
    )
    p.add_argument(
        "--timestep-spacing",
        choices=["leading", "trailing", "linspace"],
        default=None,
        help="default: the model's (ours: trailing; SD files: each sampler's diffusers default, DDIM/DDPM "
        "leading, the others linspace; diffusers folders: their scheduler_config.json's)",
    )
    p.add_argument("--steps-offset", type=int, default=None, help="default: the model's (SD v1: 1)")
    p.add_argument(
        "--karras-convention",
        choices=["a1111", "diffusers"],
        default=None,
        help="*_karras samplers: sigmas over the model's whole range (a1111, k-diffusion; default) or the "
        "range diffusers' scheduler with use_karras_sigmas=True takes (diffusers)",
    )
    p.add_argument(
        "--set-alpha-to-one",
        choices=["true", "false"],
        default=None,
        help="DDIM's last step ends on clean data (true) or at abar_0 (false; SD v1); default: the model's",
    )
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the training size)")
    p.add_argument(
        "--init-image", default=None, help="img2img: start from this image (resized to --resolution)"
    )
    p.add_argument(
        "--strength",
        type=float,
        default=0.75,
        help="img2img: how much of the schedule to run, (0, 1]; 1 ignores the image (default 0.75)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        help="LoRA .safetensors (kohya or diffusers/PEFT, detected) to merge, optionally with a "
        "multiplier: file.safetensors:0.8 "
        "(repeat to stack several)",
    )
    p.add_argument(
        "--embedding",
        action="append",
        default=[],
        help="textual-inversion embedding (.safetensors / A1111 .pt) whose token then works in prompts "
        "and negative prompts: file or file:token (default token: the file's own; repeat for several)",
    )
    p.add_argument(
        "--hypernetwork",
        default=None,
        metavar="FILE[:STRENGTH]",
        help="AUTOMATIC1111 hypernetwork .pt (or .safetensors) to apply, optionally with a strength: "
        "file.pt:0.7",
    )
    p.add_argument(
        "--original-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="SDXL size condition: the original image size (default: the output size)",
    )
    p.add_argument(
        "--crop-top-left",
        type=int,
        nargs=2,
        metavar=("T", "L"),
        default=None,
        help="SDXL size condition: the crop offset (default: 0 0)",
    )
    p.add_argument(
        "--target-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="SDXL size condition: the target size (default: the output size)",
    )
    p.add_argument(
        "--aesthetic-score",
        type=float,
        default=None,
        help="SDXL refiner condition: the aesthetic score of the prompt (default 6.0; higher asks for a "
        "better-rated look)",
    )
    p.add_argument(
        "--negative-aesthetic-score",
        type=float,
        default=None,
        help="SDXL refiner condition: the aesthetic score of the negative prompt (default 2.5)",
    )
    p.add_argument(
        "--vae",
        default=None,
        help="a replacement VAE of the same architecture: a VAE .safetensors (LDM or diffusers names) or a "
        "diffusers VAE folder (e.g. a fine-tuned or fp16-fixed SDXL VAE)",
    )
    p.add_argument("--no-ema", action="store_true", help="sample with the raw instead of the EMA weights")
    p.add_argument(
        "--compile",
        choices=["whole", "blocks"],
        default=None,
        help="torch.compile the UNet (whole, or each repeated block); pays off over many images and steps "
        "(docs/scale.md: Compiled steps)",
    )
    p.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the grid and images of an earlier call "
        "in --out (default: refuse, so earlier samples are never lost silently)",
    )
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad values stop here, before any weights load, naming the flag."""
    if args.n < 1:
        parser.error(f"--n must be >= 1 (images per prompt), got {args.n}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        parser.error(f"--guidance must be a finite number, got {args.guidance}")
    if args.eta is not None and not (math.isfinite(args.eta) and args.eta >= 0):
        parser.error(f"--eta must be a finite number >= 0, got {args.eta}")
    if args.resolution is not None and args.resolution < 8:
        parser.error(f"--resolution must be a positive multiple of the VAE factor, got {args.resolution}")
    if args.vae is not None and not Path(args.vae).exists():
        parser.error(f"--vae {args.vae}: no such file or folder")
    if args.init_image is not None:
        if not Path(args.init_image).is_file():
            parser.error(f"--init-image {args.init_image}: no such file")
        if not (math.isfinite(args.strength) and 0 < args.strength <= 1):
            parser.error(f"--strength must be in (0, 1], got {args.strength}")
    for spec in args.lora:
        if not Path(parse_lora(spec)[0]).is_file():
            parser.error(
                f"--lora {spec}: no such file (give path.safetensors or path.safetensors:multiplier)"
            )
    negatives = args.negative_prompt or [""]
    if len(negatives) not in (1, len(args.prompt)):
        parser.error(
            f"{len(negatives)} --negative-prompt for {len(args.prompt)} --prompt: give one for all, "
            "or one per prompt"
        )


def compile_for_sampling(model, mode: str, backend: str, use_ema: bool) -> int:
    """Compile in place the UNet ``generate`` runs (the EMA copy when sampling with it); compiled at the
    first batch, whose time the log reports."""
    unet = model.unet_ema.module if use_ema and getattr(model, "unet_ema", None) is not None else model.unet
    count = compile_in_place(unet, mode, backend)
    print(f"torch.compile ({backend}) of the UNet: {mode}, {count} module(s); compiled at the first batch")
    return count


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "empty"


def generation_parameters(
    args, prompt: str, negative: str, seed: int, resolution: int, guidance: float, made_with=("", {})
) -> str:
    """AUTOMATIC1111's ``parameters`` text: prompt, ``Negative prompt:`` line, then ``Key: value, ...``.
    ``made_with``: (prompt tags, fields) of the model and adapters (``infotext_of_models``)."""
    tags, model_fields = made_with
    fields = {
        "Steps": args.steps,
        "Sampler": display_name(args.sampler),
        "CFG scale": f"{guidance:g}",
        "Seed": seed,
        "Size": f"{resolution}x{resolution}",
        "Model hash": model_fields.get("Model hash"),
        "Model": Path(str(args.ckpt)).stem,
    }
    if args.init_image:
        fields["Denoising strength"] = f"{args.strength:g}"
    if args.eta is not None:
        fields["Eta"] = f"{args.eta:g}"
    fields.update({k: v for k, v in model_fields.items() if k != "Model hash"})
    return format_infotext(f"{prompt} {tags}" if tags else prompt, negative, fields)


def infotext_of_models(args) -> tuple[str, dict]:
    """(prompt tags, fields): the checkpoint's ``Model hash``, LoRA / embedding / hypernetwork hashes."""
    from ldm.io.embeddings import load_embedding, parse_embedding_spec

    embeddings = [parse_embedding_spec(spec) for spec in args.embedding]
    tags, fields = adapter_fields(
        [parse_lora(spec) for spec in args.lora],
        [(path, load_embedding(path, token).token) for path, token in embeddings],
        parse_lora(args.hypernetwork) if args.hypernetwork else None,
    )
    return tags, {"Model hash": model_hash(resolve_last(args.ckpt, args.log_dir)), **fields}


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse (one actionable line) to write over an earlier call's ``grid.png`` unless asked to."""
    if (out / "grid.png").exists() and not overwrite:
        raise SystemExit(
            f"error: {out / 'grid.png'} exists (an earlier sample.py call): pass --out <a new "
            "folder>, or --overwrite to replace it"
        )


def check_conditions(model, sizes: dict, ckpt: str) -> None:
    """A size / aesthetic option this model does not read stops here, naming the flag and what reads it."""
    unread = unread_conditions(model.conditioner.input_keys, sizes)
    if unread:
        flags = ", ".join("--" + name.replace("_", "-") for name in unread)
        raise ValueError(
            f"{flags}: {ckpt} does not take this condition (--original-size/--crop-top-left are SDXL's, "
            "--target-size the SDXL base's, --aesthetic-score/--negative-aesthetic-score the SDXL "
            "refiner's); leave it out"
        )


def main(argv=None) -> Path:
    args = parse_args(argv)
    check_output_folder(Path(args.out), args.overwrite)
    threads = AdaptiveThreads() if may_adapt() else None  # the cores other processes leave free
    sampler = build_sampler(
        args.sampler,
        steps=args.steps,
        eta=args.eta,
        timestep_spacing=args.timestep_spacing,
        steps_offset=args.steps_offset,
        karras_convention=args.karras_convention,
        set_alpha_to_one=None if args.set_alpha_to_one is None else args.set_alpha_to_one == "true",
    )
    model = load_for_sampling(
        args.ckpt,
        args.device,
        not args.no_ema,
        args.tokenizer,
        args.lora,
        sampler,
        args.resolution,
        args.log_dir,
        args.embedding,
        args.hypernetwork,
        vae=args.vae,
    )
    resolution = model.image_resolution
    check_resolution(model, resolution)
    sizes = {
        "original_size": args.original_size,
        "crop_top_left": args.crop_top_left,
        "target_size": args.target_size,
        "aesthetic_score": args.aesthetic_score,
        "negative_aesthetic_score": args.negative_aesthetic_score,
    }
    check_conditions(model, sizes, args.ckpt)
    if args.compile:
        compile_for_sampling(model, args.compile, args.compile_backend, not args.no_ema)
    init = load_init_image(args.init_image, resolution) if args.init_image else None
    guidance = model.hparams.guidance_scale if args.guidance is None else args.guidance
    made_with = infotext_of_models(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    thumbnails, count = [], 0
    started = time.perf_counter()
    if threads is not None:
        threads.step()
    for batch in generate_batches(
        model,
        sampler,
        args.prompt,
        args.negative_prompt,
        n=args.n,
        guidance=guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        use_ema=not args.no_ema,
        init_image=init,
        strength=args.strength,
        sizes=sizes,
    ):
        for j, (prompt, negative, array) in enumerate(
            zip(batch.prompts, batch.negatives, to_uint8(batch.images))
        ):
            text = generation_parameters(
                args, prompt, negative, batch.seeds[j], resolution, guidance, made_with
            )
            save_image(
                Image.fromarray(array),
                out / f"{batch.start + j:03d}_{slug(prompt)}.png",
                {"parameters": text},
            )
        if threads is not None:
            threads.step()  # between batches: the next one runs on the cores free now
        step = max(1, resolution // 128)
        thumbnails.append(batch.images[:, :, ::step, ::step].cpu())
        count += len(batch.prompts)
        if args.compile and count == len(batch.prompts):
            print(f"first batch (UNet compiled, {args.compile}) in {time.perf_counter() - started:.1f} s")
    grid = Image.fromarray(make_grid(torch.cat(thumbnails), nrow=args.n))
    upscale = max(1, 128 // resolution)
    grid = save_image(
        grid.resize((grid.width * upscale, grid.height * upscale), Image.NEAREST), out / "grid.png"
    )
    print(f"wrote {count} images and {grid}")
    return grid


if __name__ == "__main__":
    run_main(main)
