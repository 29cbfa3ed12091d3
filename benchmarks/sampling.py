"""Sampling benchmark: speed of each sampler vs diffusers' pipeline, and prompt fidelity per sampler and step
count.

    python benchmarks/sampling.py --ckpt last                # both parts
    python benchmarks/sampling.py --part speed --batch 8 --steps 20 --repeats 5
    python benchmarks/sampling.py --part fidelity --ckpt last --n 90 --fidelity-steps 10,20,30

Speed: a diffusers ``StableDiffusionPipeline`` with the embedded model's architecture (small UNet, f=4 VAE,
tiny CLIP; random weights) is saved to a temporary folder and loaded by our ``load_base_model``: both sides
run the same weights, prompts, initial latents, guidance and step count, ours with ``generate`` and diffusers
with the matching scheduler (from the folder's config, as users swap schedulers). Calls alternate between the
two; the table gives images/s from the median of ``--repeats`` calls and ours/diffusers.

Fidelity: our checkpoint (``--ckpt``, ``last`` = newest txt2img run) on the held-out prompts, scored by the
shapes evaluator (colour AND shape right), for each sampler at each step count; then the fewest steps at which
each sampler reaches ``--target`` (default 95%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.utils.threads import thread_env

os.environ.update(thread_env())  # before torch loads OpenMP (docs/scale.md: Threads)

import torch

from ldm.diffusion import build_sampler
from ldm.diffusion.samplers import display_name
from ldm.utils.task import run_main

# ours -> (diffusers scheduler class, extra config); heun: diffusers' Heun repeats timesteps its own way (same
# number of model evaluations, another discretisation); dpmpp_2s_a has no diffusers scheduler.
DIFFUSERS_SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2s_a": (None, {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
PROMPT = "a red circle on a blue background"


def embedded_architecture_pipeline(folder: Path):
    """A random diffusers SD pipeline with the embedded model's architecture, saved to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from omegaconf import OmegaConf
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.io.diffusers_config import diffusers_config_from_ldm
    from ldm.modules.text_encoder import CLIPTextEncoder

    unet_cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/unet/small.yaml"))
    unet_cfg.pop("_target_")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, **diffusers_config_from_ldm(**unet_cfg))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    CLIPTextEncoder.tiny().save_pretrained(folder / "clip", layout="diffusers")
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(folder / "clip" / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "clip" / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder / "pipe")
    pipe.set_progress_bar_config(disable=True)
    return pipe, folder / "pipe"


def speed(args) -> list[tuple]:
    import diffusers

    from ldm.models.base_loader import latent_diffusion_from_components, load_base_model

    with tempfile.TemporaryDirectory() as tmp:
        pipe, folder = embedded_architecture_pipeline(Path(tmp))
        model = latent_diffusion_from_components(load_base_model(folder))
        config = pipe.scheduler.config
    prompts = [PROMPT] * args.batch
    latents = torch.randn(args.batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in args.samplers.split(","):
        sampler = build_sampler(name, steps=args.steps)
        class_name, extra = DIFFUSERS_SCHEDULERS.get(name, (None, {}))

        def ours(sampler=sampler):
            model.generate(prompts, guidance_scale=args.guidance, sampler=sampler, latents=latents)

        def theirs():
            pipe(
                prompts,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                latents=latents.clone(),
                output_type="pt",
            )

        if class_name:
            pipe.scheduler = getattr(diffusers, class_name).from_config(config, **extra)
        times = {"ours": [], "diffusers": []}
        ours(), theirs() if class_name else None  # warm-up
        for _ in range(args.repeats):
            for side, call in (("ours", ours), ("diffusers", theirs if class_name else None)):
                if call is None:
                    continue
                start = time.perf_counter()
                call()
                times[side].append(time.perf_counter() - start)
        ours_ips = args.batch / statistics.median(times["ours"])
        theirs_ips = args.batch / statistics.median(times["diffusers"]) if class_name else None
        rows.append((name, class_name, ours_ips, theirs_ips))
        ratio = f"{ours_ips / theirs_ips:.2f}x" if theirs_ips else "-"
        print(
            f"{name:16s} ours {ours_ips:7.2f} img/s   diffusers {theirs_ips or 0:7.2f} img/s   {ratio}",
            flush=True,
        )
    print(
        "\n| sampler (ours / AUTOMATIC1111) | diffusers scheduler | ours img/s | diffusers img/s | ours / "
        "diffusers |"
    )
    print("|---|---|---|---|---|")
    for name, class_name, ours_ips, theirs_ips in rows:
        extra = " (Karras)" if name.endswith("_karras") else ""
        print(
            f"| `{name}` / {display_name(name)} | {class_name or '-'}{extra} | {ours_ips:.2f} | "
            f"{f'{theirs_ips:.2f}' if theirs_ips else '-'} | "
            f"{f'{ours_ips / theirs_ips:.2f}x' if theirs_ips else '-'} |"
        )
    return rows


def fidelity(args) -> dict:
    from benchmarks.fidelity import prompts_for, score
    from ldm.models.pipeline import load_for_sampling

    model = load_for_sampling(args.ckpt, log_dir=args.log_dir)
    base = prompts_for("heldout", 10_000)
    prompts = [base[i % len(base)] for i in range(args.n)]
    step_counts = [int(s) for s in args.fidelity_steps.split(",")]
    results = {}
    for name in args.samplers.split(","):
        for steps in step_counts:
            start = time.perf_counter()
            result, _ = score(model, prompts, build_sampler(name, steps=steps), args.guidance, args.seed)
            results[name, steps] = result["fidelity"]
            print(
                f"{name:16s} {steps:3d} steps fidelity {result['fidelity']:.3f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    print(
        "\n| sampler | "
        + " | ".join(f"{s} steps" for s in step_counts)
        + f" | fewest steps >= {args.target:.0%} |"
    )
    print("|---|" + "---|" * (len(step_counts) + 1))
    for name in args.samplers.split(","):
        reached = [s for s in step_counts if results[name, s] >= args.target]
        cells = " | ".join(f"{results[name, s]:.1%}" for s in step_counts)
        print(f"| `{name}` | {cells} | {min(reached) if reached else '-'} |")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["speed", "fidelity", "both"], default="both")
    p.add_argument("--samplers", default=",".join(DIFFUSERS_SCHEDULERS))
    p.add_argument("--steps", type=int, default=20, help="speed: steps per image")
    p.add_argument("--batch", type=int, default=8, help="speed: images per call")
    p.add_argument("--repeats", type=int, default=5, help="speed: timed calls per side")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--ckpt", default="last", help="fidelity: our checkpoint ('last' = newest txt2img run)")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--n", type=int, default=90, help="fidelity: held-out prompts per cell")
    p.add_argument("--fidelity-steps", default="10,20,30")
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {}
    if args.part in ("speed", "both"):
        out["speed"] = speed(args)
    if args.part in ("fidelity", "both"):
        out["fidelity"] = fidelity(args)
    return out


if __name__ == "__main__":
    run_main(main)
