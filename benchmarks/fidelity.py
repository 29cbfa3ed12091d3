"""Prompt fidelity of a text-to-image checkpoint on the embedded data, scored by the shapes evaluator
(colour AND shape read back from the image must match the prompt).

    python benchmarks/fidelity.py --ckpt last          # held-out prompts, DPM++ 20 vs DDIM 50
    python benchmarks/fidelity.py --ckpt last \
        --lora logs/lora_finetune/runs/<run>/adapters/lora_finetune.safetensors
    python benchmarks/fidelity.py --ckpt last \
        --embedding logs/textual_inversion/runs/<run>/adapters/embedding.safetensors
    python benchmarks/fidelity.py --ckpt last \
        --hypernetwork logs/hypernetwork/runs/<run>/adapters/hypernetwork.pt

Prompt sets: ``heldout`` (combinations never seen in base training), ``concept`` (the held-out concept,
e.g. "star", what fine-tuning teaches) and ``known`` (seen combinations). With ``--lora`` (``--hypernetwork``)
each set is scored for the base and for base + LoRA (hypernetwork), so the gain on the concept and the change
on known prompts are side by side.
With ``--embedding`` (textual inversion) the "base+embedding" model gets the prompts with the concept word
(``--concept-word``, default "star") replaced by the embedding's token; the evaluator scores the original
prompt.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.shapes import ShapesDataModule
from datamodules.shapes_evaluator import ShapesEvaluator
from ldm.diffusion import SAMPLERS, build_sampler
from ldm.models.pipeline import load_for_sampling
from ldm.utils.images import save_labelled_grid
from ldm.utils.task import run_main


def parse_sampler(spec: str) -> tuple[str, int]:
    """``"dpmpp_2m-20"`` -> ("dpmpp_2m", 20): any sampler name, then its step count."""
    name, _, steps = spec.rpartition("-")
    if name not in SAMPLERS or not steps.isdigit():
        raise SystemExit(
            f"--samplers: {spec!r} is not <sampler>-<steps> with a sampler from {list(SAMPLERS)}"
        )
    return name, int(steps)


def prompts_for(split: str, n: int, seed: int = 0) -> list[str]:
    dm = ShapesDataModule(seed=seed)
    if split == "known":
        return dm.prompts("train")[:n]
    return dm.prompts(split)[:n]


@torch.no_grad()
def score(
    model, prompts: list[str], sampler, guidance: float | None, seed: int, batch: int = 32, rewrite=None
):
    """Generate for ``prompts`` (each passed through ``rewrite`` first, e.g. to put a token in) and score the
    images against the original prompts."""
    evaluator = ShapesEvaluator()
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        images.append(
            model.generate(
                [rewrite(p) for p in chunk] if rewrite else chunk,
                guidance_scale=guidance,
                seed=seed + i,
                sampler=sampler,
            )
        )
    images = torch.cat(images)
    return evaluator.score(images, prompts), images


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="last")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--lora", action="append", default=[])
    p.add_argument("--embedding", action="append", default=[], help="textual-inversion file[:token]")
    p.add_argument("--concept-word", default="star", help="word the embedding's token replaces in prompts")
    p.add_argument("--hypernetwork", default=None, help="AUTOMATIC1111 hypernetwork file[:strength]")
    p.add_argument(
        "--sets",
        default=None,
        help="comma list of heldout,concept,known (default: heldout, or "
        "concept,known with --lora / --embedding / --hypernetwork)",
    )
    p.add_argument(
        "--samplers", default="dpmpp_2m-20,ddim-50", help="comma list of <sampler>-<steps>, e.g. euler_a-30"
    )
    p.add_argument("--n", type=int, default=90, help="prompts per set (cycled)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--grid-dir", default=None, help="save one grid per set/sampler here")
    p.add_argument(
        "--compare-grid",
        default=None,
        help="save a before/after grid here: one row per model, the "
        "first --compare-columns prompts of each set (first sampler), same seeds",
    )
    p.add_argument("--compare-columns", type=int, default=4)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    adapted = args.lora or args.embedding or args.hypernetwork
    sets = (args.sets or ("concept,known" if adapted else "heldout")).split(",")
    variants = {"base": load_for_sampling(args.ckpt, log_dir=args.log_dir)}
    if args.lora:
        variants["base+lora"] = load_for_sampling(args.ckpt, loras=args.lora, log_dir=args.log_dir)
    if args.hypernetwork:
        variants["base+hypernetwork"] = load_for_sampling(
            args.ckpt, log_dir=args.log_dir, hypernetwork=args.hypernetwork
        )
    rewrite = {}
    if args.embedding:
        model = load_for_sampling(args.ckpt, log_dir=args.log_dir, embeddings=args.embedding)
        variants["base+embedding"] = model
        token = list(model.text_encoder.placeholders)[-1]
        word = re.compile(rf"\b{re.escape(args.concept_word)}\b")
        rewrite["base+embedding"] = lambda prompt: word.sub(token, prompt)
    rows, firsts = [], {}
    for split in sets:
        base_prompts = prompts_for(split, 10_000)
        prompts = [base_prompts[i % len(base_prompts)] for i in range(args.n)]
        for sampler_name in args.samplers.split(","):
            name, steps = parse_sampler(sampler_name)
            for variant, model in variants.items():
                start = time.perf_counter()
                result, images = score(
                    model,
                    prompts,
                    build_sampler(name, steps=steps),
                    args.guidance,
                    args.seed,
                    rewrite=rewrite.get(variant),
                )
                seconds = time.perf_counter() - start
                rows.append((split, sampler_name, variant, result, seconds))
                firsts.setdefault(
                    (split, variant), (images[: args.compare_columns], prompts[: args.compare_columns])
                )
                if args.grid_dir:
                    save_labelled_grid(
                        images[:12],
                        prompts[:12],
                        Path(args.grid_dir) / f"{split}_{sampler_name}_{variant}.png",
                    )
                print(
                    f"{split:8s} {sampler_name:12s} {variant:17s} fidelity {result['fidelity']:.3f} "
                    f"colour {result['color_acc']:.3f} shape {result['shape_acc']:.3f} "
                    f"background {result['background_acc']:.3f} ({seconds:.0f} s)",
                    flush=True,
                )
    print("\n| prompts | sampler | model | fidelity | colour | shape | background | n |")
    print("|---|---|---|---|---|---|---|---|")
    for split, sampler_name, variant, r, _ in rows:
        print(
            f"| {split} | {sampler_name} | {variant} | {r['fidelity']:.1%} | {r['color_acc']:.1%} | "
            f"{r['shape_acc']:.1%} | {r['background_acc']:.1%} | {r['n']} |"
        )
    if args.compare_grid:
        grid = {v: torch.cat([firsts[(split, v)][0] for split in sets]) for v in variants}
        labels = [p for split in sets for p in firsts[(split, "base")][1]]
        print(f"wrote {save_comparison_grid(grid, labels, args.compare_grid)}")
    return {(s, sm, v): r for s, sm, v, r, _ in rows}


def save_comparison_grid(
    rows: dict[str, torch.Tensor], labels: list[str], path: str | Path, cell: int = 96
) -> Path:
    """One row of images per model (label on the left), one column per prompt (label on top)."""
    from PIL import Image, ImageDraw

    from ldm.utils.images import to_uint8

    left, top, gap = 110, 34, 6
    ncol = len(labels)
    canvas = Image.new("RGB", (left + ncol * (cell + gap), top + len(rows) * (cell + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        words = label.replace("background", "bg").split()
        half = (len(words) + 1) // 2
        draw.multiline_text(
            (left + c * (cell + gap), 2),
            " ".join(words[:half]) + "\n" + " ".join(words[half:]),
            fill=(0, 0, 0),
            spacing=1,
        )
    for r, (name, images) in enumerate(rows.items()):
        y = top + r * (cell + gap)
        draw.text((4, y + cell // 2 - 6), name, fill=(0, 0, 0))
        for c, array in enumerate(to_uint8(images)):
            canvas.paste(
                Image.fromarray(array).resize((cell, cell), Image.NEAREST), (left + c * (cell + gap), y)
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


if __name__ == "__main__":
    run_main(main)
