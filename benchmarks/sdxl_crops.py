"""What SDXL's crop conditioning does, on the embedded data: sample the same prompts from the same seeds at
crop (0, 0) and at large crop offsets, and measure how often the shape is whole or cut off by each border
(the SDXL paper's crop-conditioning figure, measured).

    python benchmarks/sdxl_crops.py --ckpt <experiment=txt2img_sdxl run>/checkpoints/last.ckpt
    python benchmarks/sdxl_crops.py --ckpt <...> --crops 0,0 0,8 8,0 8,8 --n 64 --grid docs/sdxl_crops.png

experiment=txt2img_sdxl renders three quarters of its 32 px training images 8 px larger (40 px, the original
size) and keeps a random 32 px window (crop top/left 0..8), so the crop decides which borders can cut the
shape: at (0, 0) only the bottom and right ones, at (8, 8) only the top and left ones; the other quarter is
rendered at 32 and kept whole (original = target, crop (0, 0)). The first row samples at sampling's defaults
(original = target = the resolution, crop (0, 0): an uncropped image, the paper's "whole object" setting);
the others at original size ``--original-size`` (default: resolution + 8, what training saw), target size =
the resolution and each crop of ``--crops``.

The criterion (:func:`touched_sides`): the foreground is every pixel farther than half the image's contrast
from the background colour (the median of the outermost ring of pixels); a border "cuts" the shape when at
least ``max(2, side / 16)`` foreground pixels lie on that outermost row or column; a shape is "whole" when
there is a foreground and no border cuts it. The same measure on the training data at the same crop (rendered
40 px, cropped there) is printed beside each row: what the model should reproduce.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.shapes import ShapesDataModule, parse_caption, render
from datamodules.shapes_evaluator import to_uint8_hwc
from ldm.utils.files import atomic_write_text
from ldm.utils.task import run_main

SIDES = ("top", "bottom", "left", "right")


def touched_sides(image, min_contrast: float = 40.0) -> set[str] | None:
    """The borders of ``image`` (tensor [3, H, W] in [-1, 1], uint8 [H, W, 3] or PIL) that the foreground
    reaches; None when there is no foreground (contrast to the background below ``min_contrast``)."""
    x = to_uint8_hwc(image)
    ring = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
    distance = np.linalg.norm(x - np.median(ring, axis=0), axis=-1)
    peak = float(np.percentile(distance, 99.5))
    if peak < min_contrast:
        return None
    fg = distance > 0.5 * peak
    need = max(2, min(fg.shape) // 16)
    edges = {"top": fg[0], "bottom": fg[-1], "left": fg[:, 0], "right": fg[:, -1]}
    return {side for side, line in edges.items() if int(line.sum()) >= need}


def crop_stats(images) -> dict[str, float]:
    """Fractions of ``images`` with no shape, a whole shape, and a shape cut by each border."""
    reads = [touched_sides(image) for image in images]
    n = max(len(reads), 1)
    stats = {
        "n": len(reads),
        "empty": sum(r is None for r in reads) / n,
        "whole": sum(r is not None and not r for r in reads) / n,
    }
    for side in SIDES:
        stats[side] = sum(r is not None and side in r for r in reads) / n
    return stats


def data_images(prompts: list[str], resolution: int, original: int, crop: tuple[int, int], seed: int = 0):
    """The training data's images for ``prompts`` at a fixed crop: rendered at ``original`` px (random layout
    from seed [seed, i]), the ``resolution`` window at ``crop`` kept."""
    top, left = crop
    out = []
    for i, prompt in enumerate(prompts):
        color, shape, background = parse_caption(prompt)
        image = render(color, shape, background, original, np.random.default_rng([seed, i]))
        out.append(image[top : top + resolution, left : left + resolution])
    return out


def parse_crop(spec: str) -> tuple[int, int]:
    try:
        top, left = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"error: --crops: {spec!r} is not TOP,LEFT (two integers, e.g. 8,8)") from None
    return top, left


@torch.no_grad()
def sample_at(model, prompts, sampler, crop, original: int, seed: int, batch: int = 32) -> torch.Tensor:
    """``prompts`` sampled at size conditions original (original, original), crop ``crop``, target = the
    model's resolution; image i from seed ``seed + i`` whatever the crop."""
    from ldm.models.pipeline import generate_batches

    sizes = {"original_size": (original, original), "crop_top_left": crop, "target_size": None}
    batches = generate_batches(
        model, sampler, prompts, seed=seed, batch_size=batch, progress=False, sizes=sizes, guidance=None
    )
    images = [b.images for b in batches]
    return torch.cat(images)


def table(rows: list[dict]) -> str:
    head = (
        "| size conditions | whole | cut: top / bottom / left / right | no shape | data: whole | data: cut |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for row in rows:
        s, d = row["samples"], row["data"]
        cut = " / ".join(f"{100 * s[k]:.0f}%" for k in SIDES)
        data_cut = " / ".join(f"{100 * d[k]:.0f}%" for k in SIDES)
        lines.append(
            f"| {row['label']} | {100 * s['whole']:.0f}% | {cut} | "
            f"{100 * s['empty']:.0f}% | {100 * d['whole']:.0f}% | {data_cut} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    from ldm.diffusion import build_sampler
    from ldm.models.pipeline import load_for_sampling
    from ldm.utils.images import save_labelled_grid

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="an experiment=txt2img_sdxl checkpoint (or 'last')")
    p.add_argument("--log-dir", default="logs")
    p.add_argument("--crops", nargs="+", default=["0,0", "0,8", "8,0", "8,8"], help="TOP,LEFT offsets")
    p.add_argument("--original-size", type=int, default=None, help="default: the resolution + 8")
    p.add_argument(
        "--no-defaults",
        dest="defaults",
        action="store_false",
        help="leave out the row at sampling's defaults (original = target = the resolution, crop (0, 0))",
    )
    p.add_argument("--n", type=int, default=64, help="prompts (training combinations), one seed each")
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--grid", default=None, help="write a PNG: one row per crop, the first --grid-cols prompts"
    )
    p.add_argument("--grid-cols", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    crops = [parse_crop(c) for c in args.crops]
    model = load_for_sampling(args.ckpt, log_dir=args.log_dir)
    if getattr(model.unet, "adm_in_channels", None) is None:
        raise SystemExit(f"error: --ckpt {args.ckpt}: its UNet has no size conditions (not an SDXL model)")
    resolution = model.image_resolution
    original = args.original_size or resolution + 8
    prompts = ShapesDataModule().prompts("train")
    prompts = (prompts * (args.n // len(prompts) + 1))[: args.n]
    sampler = build_sampler(args.sampler, steps=args.steps)
    # sampling's defaults first (original = target, crop (0, 0): an uncropped image), then the training's
    # original size at each crop
    settings = (
        [(f"original = target = {resolution}, crop (0, 0)", resolution, (0, 0))] if args.defaults else []
    )
    settings += [(f"original {original}, crop ({t}, {left})", original, (t, left)) for t, left in crops]
    rows, grid_images, labels = [], [], []
    for label, size, crop in settings:
        images = sample_at(model, prompts, sampler, crop, size, args.seed)
        data = data_images(prompts, resolution, size, crop)
        row = {"label": label, "original": size, "crop": list(crop)}
        rows.append({**row, "samples": crop_stats(images), "data": crop_stats(data)})
        grid_images.append(images[: args.grid_cols])
        short = f"crop {crop[0]},{crop[1]}" + (" orig=tgt" if size == resolution else "")
        labels += [short] * min(args.grid_cols, len(images))
        print(f"{label}: samples {rows[-1]['samples']}  data {rows[-1]['data']}", flush=True)
    print(
        f"\n{args.n} prompts, {args.sampler}-{args.steps}, original {original}, target {resolution}\n"
        + table(rows)
    )
    if args.grid:
        save_labelled_grid(torch.cat(grid_images), labels, args.grid, ncol=args.grid_cols, cell=64)
        print(f"wrote {args.grid}")
    result = {"args": vars(args), "rows": rows}
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_main(main)
