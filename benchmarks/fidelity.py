"""Prompt fidelity of a text-to-image checkpoint on the embedded data, scored by the shapes evaluator
(colour AND shape read back from the image must match the prompt).

    python benchmarks/fidelity.py --ckpt last                                # held-out prompts, DPM++ 20 vs DDIM 50
    python benchmarks/fidelity.py --ckpt last --lora logs/lora_finetune/runs/<run>/adapters/lora_finetune.safetensors

Prompt sets: ``heldout`` (combinations never seen in base training), ``concept`` (the held-out concept,
e.g. "star", what fine-tuning teaches) and ``known`` (seen combinations). With ``--lora`` each set is scored
for the base and for base + LoRA, so the gain on the concept and the change on known prompts are side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.shapes import ShapesDataModule
from datamodules.shapes_evaluator import ShapesEvaluator
from ldm.diffusion import build_sampler
from ldm.utils.images import save_labelled_grid
from sample import load_for_sampling

SAMPLERS = {"dpmpp_2m-20": ("dpmpp_2m", 20), "ddim-50": ("ddim", 50), "ddpm-100": ("ddpm", 100)}


def parse_sampler(spec: str) -> tuple[str, int]:
    """``ddim-50`` -> ("ddim", 50): any ``<sampler>-<steps>``, the presets above included."""
    name, sep, steps = spec.rpartition("-")
    if not sep or not steps.isdigit():
        raise SystemExit(f"--samplers: {spec!r} is not <sampler>-<steps> (e.g. {', '.join(SAMPLERS)})")
    return name, int(steps)


def prompts_for(split: str, n: int, seed: int = 0) -> list[str]:
    dm = ShapesDataModule(seed=seed)
    if split == "known":
        return dm.prompts("train")[:n]
    return dm.prompts(split)[:n]


@torch.no_grad()
def score(model, prompts: list[str], sampler, guidance: float | None, seed: int, batch: int = 32):
    evaluator = ShapesEvaluator()
    images = []
    for i in range(0, len(prompts), batch):
        images.append(model.generate(prompts[i:i + batch], guidance_scale=guidance, seed=seed + i,
                                     sampler=sampler))
    images = torch.cat(images)
    return evaluator.score(images, prompts), images


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="last")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--lora", action="append", default=[])
    p.add_argument("--sets", default=None, help="comma list of heldout,concept,known (default: heldout, or "
                   "concept,known with --lora)")
    p.add_argument("--samplers", default="dpmpp_2m-20,ddim-50",
                   help=f"comma list of <sampler>-<steps>, e.g. {','.join(SAMPLERS)}")
    p.add_argument("--n", type=int, default=90, help="prompts per set (cycled)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--grid-dir", default=None, help="save one grid per set/sampler here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sets = (args.sets or ("concept,known" if args.lora else "heldout")).split(",")
    variants = {"base": load_for_sampling(args.ckpt, log_dir=args.log_dir)}
    if args.lora:
        variants["base+lora"] = load_for_sampling(args.ckpt, loras=args.lora, log_dir=args.log_dir)
    rows = []
    for split in sets:
        base_prompts = prompts_for(split, 10_000)
        prompts = [base_prompts[i % len(base_prompts)] for i in range(args.n)]
        for sampler_name in args.samplers.split(","):
            name, steps = parse_sampler(sampler_name)
            for variant, model in variants.items():
                start = time.perf_counter()
                result, images = score(model, prompts, build_sampler(name, steps=steps), args.guidance, args.seed)
                seconds = time.perf_counter() - start
                rows.append((split, sampler_name, variant, result, seconds))
                if args.grid_dir:
                    save_labelled_grid(images[:12], prompts[:12],
                                       Path(args.grid_dir) / f"{split}_{sampler_name}_{variant}.png")
                print(f"{split:8s} {sampler_name:12s} {variant:10s} fidelity {result['fidelity']:.3f} "
                      f"colour {result['color_acc']:.3f} shape {result['shape_acc']:.3f} "
                      f"background {result['background_acc']:.3f} ({seconds:.0f} s)", flush=True)
    print("\n| prompts | sampler | model | fidelity | colour | shape | background | n |")
    print("|---|---|---|---|---|---|---|---|")
    for split, sampler_name, variant, r, _ in rows:
        print(f"| {split} | {sampler_name} | {variant} | {r['fidelity']:.1%} | {r['color_acc']:.1%} | "
              f"{r['shape_acc']:.1%} | {r['background_acc']:.1%} | {r['n']} |")
    return {(s, sm, v): r for s, sm, v, r, _ in rows}


if __name__ == "__main__":
    main()
