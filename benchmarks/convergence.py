"""Which training objective converges fastest on the embedded txt2img task? One VAE, then
``experiment=txt2img`` for each objective option x seed, a checkpoint every ``--every`` steps; each
checkpoint is scored for held-out prompt fidelity (benchmarks/fidelity.py's scoring: DPM++ 2M 20 steps,
guidance 3), validation loss in fixed timestep buckets (fixed validation latents and noise, EMA weights; as
eps-MSE and x0-MSE, comparable across parameterizations) and, every ``--brightness-every`` steps, offset
noise's own claim: the fraction of samples for "... on a black background" / "... on a white background"
prompts as dark / bright as the real images.

    python benchmarks/convergence.py --out convergence_out --png docs/convergence.png     # the whole grid
    # table + plot:
    python benchmarks/convergence.py --out convergence_out --png docs/convergence.png --collect

Resumable: run the same command again. Runs with all checkpoints scored are skipped, a killed run resumes
from its ``last.ckpt`` (``ckpt_path=...``), scored checkpoints are not scored again. Every result is a row of
``<out>/convergence.csv``; ``--collect`` (and the end of a grid) prints the table (steps to ``--target``
fidelity per option, mean and min-max over seeds), writes it to ``<out>/convergence.md`` and draws fidelity vs
step per option (mean line, min-max band over seeds) into ``--png``. A run stops early once two consecutive
checkpoints reach ``--target``. Training runs are child processes (one thread each, ``nice``), ``--jobs`` at a
time; scoring happens in this process between polls.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.grid.runs import (  # the machinery benchmarks/methods.py shares
    CHILD_ENV,  # noqa: F401  (the grid's child environment, also as convergence.CHILD_ENV)
    Results,
    checkpoints,
    common_overrides,
    launch,
    reached,
    resume_override,
    spread,
)
from ldm.utils.files import atomic_write_text
from ldm.utils.task import run_main

OPTIONS = {  # name -> train.py overrides; each names its whole loss, whatever experiment=txt2img defaults to
    "eps": ["model/loss=eps"],
    "eps+minsnr5": ["model/loss=eps_min_snr"],
    "v": ["model/loss=v"],
    "v+minsnr5": ["model/loss=v_min_snr"],
    "eps+offset0.05": ["model/loss=eps", "model.offset_noise=0.05"],
}
BUCKETS = 4


def train_vae(args) -> Path:
    """The grid's one VAE (``<out>/vae``), trained once; a killed VAE run resumes."""
    run_dir = Path(args.out) / "vae"
    last = run_dir / "checkpoints" / "last.ckpt"
    if (run_dir / "done.json").is_file():
        return last
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        "experiment=vae",
        f"trainer.max_steps={args.vae_steps}",
        *common_overrides(run_dir),
        *args.vae_override,
        *resume_override(run_dir),
    ]
    print(f"training the VAE ({args.vae_steps} steps): {run_dir}", flush=True)
    code = launch(argv, run_dir / "train.log", args.nice, threads=args.jobs).wait()  # alone: --jobs threads
    if code != 0 or not last.is_file():
        raise SystemExit(f"error: the VAE run failed (exit {code}); see {run_dir / 'train.log'}")
    atomic_write_text(run_dir / "done.json", json.dumps({"exit": code, "finished": time.time()}))
    return last


def txt2img_argv(option: str, seed: int, cap: int, args, vae: Path, run_dir: Path) -> list[str]:
    """One round of a run: on to step ``cap`` (resuming from last.ckpt), the LR schedule always
    ``--steps`` long,
    so a run trained in rounds is the run trained at once (exact resume)."""
    return [
        "experiment=txt2img",
        "model/text_encoder=tiny",  # the grid was measured on the random frozen encoder (docs/results.md)
        f"model.vae_ckpt={vae}",
        f"seed={seed}",
        *OPTIONS[option],
        f"trainer.max_steps={cap}",
        f"model.scheduler.total_steps={args.steps}",
        f"data.batch_size={args.batch}",
        "++trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=50",
        f"++callbacks.model_checkpoint.every_n_train_steps={args.every}",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.monitor=null",
        *common_overrides(run_dir),
        *args.override,
        *resume_override(run_dir),
    ]


# -- scoring ------------------------------------------------------------------------------------------------
def fidelity_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("fidelity_script", ROOT / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validation_batch(resolution: int, n: int):
    """The first ``n`` validation images (same combinations as training, unseen items) and captions."""
    from datamodules.shapes import ShapesDataModule

    dm = ShapesDataModule(resolution=resolution, val_size=n)
    dm.setup()
    items = [dm.data_val[i] for i in range(n)]
    return torch.stack([item["image"] for item in items]), [item["caption"] for item in items]


@torch.no_grad()
def bucket_losses(model, images: torch.Tensor, captions: list[str], chunk: int = 64) -> dict[str, float]:
    """eps-MSE and x0-MSE of the EMA model at timesteps drawn (fixed seed) from each of ``BUCKETS`` equal
    ranges of [0, T), on fixed latents (posterior means) and noise."""
    schedule, param = model.schedule, model.parameterization  # an ldm.diffusion.parameterization object
    z0 = model.vae_encode(images).mean * model.scale_factor
    context = model.encode_text(captions)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(z0.shape, generator=generator)
    width = schedule.num_timesteps // BUCKETS
    row = {}
    with model.ema_scope() as unet:
        for k in range(BUCKETS):
            t = torch.randint(k * width, (k + 1) * width, (z0.shape[0],), generator=generator)
            zt = schedule.q_sample(z0, t, noise)
            out = torch.cat(
                [
                    unet(zt[i : i + chunk], t[i : i + chunk], context[i : i + chunk])
                    for i in range(0, len(zt), chunk)
                ]
            )
            row[f"val_eps_t{k * width}"] = float(((param.to_eps(zt, t, out, schedule) - noise) ** 2).mean())
            row[f"val_x0_t{k * width}"] = float(((param.to_x0(zt, t, out, schedule) - z0) ** 2).mean())
    return row


def brightness_prompts(background: str, n: int) -> list[str]:
    from datamodules.shapes import COLORS, SHAPES, caption_for

    prompts = [
        caption_for(c, s, background) for s in SHAPES if s != "star" for c in COLORS if c != background
    ]
    return [prompts[i % len(prompts)] for i in range(n)]


def real_brightness(prompts: list[str], resolution: int) -> np.ndarray:
    """Mean brightness (0-255) of the real images for ``prompts`` (random layouts, fixed seeds)."""
    from datamodules.shapes import parse_caption, render

    return np.asarray(
        [
            render(*parse_caption(p), resolution, np.random.default_rng(i)).mean()
            for i, p in enumerate(prompts)
        ]
    )


@torch.no_grad()
def brightness(model, sampler, n: int, seed: int, resolution: int) -> dict[str, float]:
    """Offset noise's claim: the share of samples as dark as the real black-background images (at most their
    95th percentile of mean brightness) / as bright as the white-background ones (at least their 5th)."""
    row = {}
    for background, sign in (("black", 1), ("white", -1)):
        prompts = brightness_prompts(background, n)
        images = torch.cat(
            [
                model.generate(prompts[i : i + 32], seed=seed + i, sampler=sampler)
                for i in range(0, len(prompts), 32)
            ]
        )
        means = ((images.clamp(-1, 1) + 1) * 127.5).mean(dim=(1, 2, 3)).numpy()
        real = real_brightness(prompts, resolution)
        limit = np.percentile(real, 95 if sign > 0 else 5)
        row[f"{background}_match"] = float(np.mean(sign * means <= sign * limit))
        row[f"{background}_mean"] = float(means.mean())
        row[f"{background}_real_mean"] = float(real.mean())
    return row


class Scorer:
    """Scores checkpoints in this process (one thread), with the prompts and validation data made once."""

    def __init__(self, args):
        self.args = args
        self.fidelity = fidelity_module()
        self.prompts = None
        self.val: dict[int, tuple] = {}

    def __call__(self, ckpt: Path, step: int) -> dict:
        from ldm.diffusion import build_sampler
        from ldm.models.pipeline import load_for_sampling

        start = time.perf_counter()
        model = load_for_sampling(str(ckpt))
        resolution = int(model.image_resolution)
        if resolution not in self.val:
            self.val[resolution] = validation_batch(resolution, self.args.val_n)
        if self.prompts is None:
            base = self.fidelity.prompts_for("heldout", 10_000)
            self.prompts = [base[i % len(base)] for i in range(self.args.n)]
        sampler = build_sampler("dpmpp_2m", steps=self.args.sampler_steps)
        result, _ = self.fidelity.score(model, self.prompts, sampler, None, 1234)
        row = {
            "fidelity": result["fidelity"],
            "color": result["color_acc"],
            "shape": result["shape_acc"],
            "background": result["background_acc"],
            "n": result["n"],
        }
        row.update(bucket_losses(model, *self.val[resolution]))
        if self.args.brightness_every and step % self.args.brightness_every == 0:
            row.update(brightness(model, sampler, self.args.brightness_n // 2, 4321, resolution))
        row["eval_s"] = round(time.perf_counter() - start, 1)
        return row


# -- the grid -----------------------------------------------------------------------------------------------
class Grid:
    """Runs advance in rounds of ``--round`` steps (one process per round, resumed from last.ckpt), seed by
    seed
    (``--order seed``: seed 0 of every option round by round to the end, then seed 1) or all together
    (``--order round``: a grid stopped at any time has all runs about equally far). ``--jobs`` training
    processes at a time; checkpoints are scored between polls (earliest run first); a run is stopped
    (SIGTERM: it saves last.ckpt) once its last two checkpoints reach the target."""

    def __init__(self, args, vae: Path, results: Results, scorer):
        self.args, self.vae, self.results, self.scorer = args, vae, results, scorer
        self.runs = [(option, seed) for seed in args.seeds for option in args.options]
        self.caps = sorted({*range(args.round, args.max_steps, args.round), args.max_steps})
        self.active: dict[tuple[str, int], tuple[subprocess.Popen, int]] = {}
        self.stopping: set[tuple[str, int]] = set()
        self.failed: set[tuple[str, int]] = set()
        self.launched = 0

    def run_dir(self, key: tuple[str, int]) -> Path:
        return Path(self.args.out) / "runs" / f"{key[0]}_s{key[1]}"

    def state(self, key) -> dict:
        """``{"steps": trained so far, "reason": ...}`` from done.json and the checkpoints (a killed
        round)."""
        path = self.run_dir(key) / "done.json"
        state = json.loads(path.read_text()) if path.is_file() else {"steps": 0, "reason": None}
        found = checkpoints(self.run_dir(key))
        state["steps"] = max(state["steps"], found[-1][0] if found else 0)
        return state

    def target_met(self, key) -> bool:
        curve = self.results.curve(*key)
        return len(curve) >= 2 and min(curve[-1][1], curve[-2][1]) >= self.args.target

    def mark_done(self, key, steps: int, reason: str) -> None:
        atomic_write_text(
            self.run_dir(key) / "done.json",
            json.dumps({"steps": steps, "reason": reason, "finished": time.time()}),
        )

    def loop(self) -> None:
        while True:
            self.reap()
            self.start()
            if self.score_one():
                continue
            if not self.active:
                return
            time.sleep(self.args.poll)

    def next_round(self, key) -> int | None:
        """The step the run's next round trains to, or None when it is finished (or failed, or running)."""
        if key in self.active or key in self.failed:
            return None
        state = self.state(key)
        if state["reason"] == "target":
            return None
        if self.target_met(key):  # scored to the target in an earlier session, stopped before done.json
            self.mark_done(key, state["steps"], "target")
            return None
        return next((cap for cap in self.caps if cap > state["steps"]), None)

    def waiting(self) -> list[tuple[int, tuple[str, int]]]:
        """(next round's end, run) of every run that can start now, in the order they should:
        ``--order seed``:
        seed 0 of every option to the end first (in rounds), then seed 1; ``round``: every run round by
        round."""
        found = []
        for i, key in enumerate(self.runs):
            cap = self.next_round(key)
            if cap is not None:
                first = self.args.seeds.index(key[1]) if self.args.order == "seed" else 0
                found.append(((first, cap, i), cap, key))
        return [(cap, key) for _, cap, key in sorted(found)]

    def start(self) -> None:
        for cap, key in self.waiting()[: max(0, self.args.jobs - len(self.active))]:
            run_dir = self.run_dir(key)
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / "started.json").is_file():
                atomic_write_text(run_dir / "started.json", json.dumps({"started": time.time()}))
            argv = txt2img_argv(*key, cap, self.args, self.vae, run_dir)
            resuming = " (resuming)" if argv[-1].startswith("ckpt_path=") else ""
            print(f"start {key[0]} seed {key[1]} to step {cap}{resuming}: {run_dir}", flush=True)
            self.active[key] = (launch(argv, run_dir / "train.log", self.args.nice), cap)
            self.launched += 1

    def reap(self) -> None:
        for key, (proc, cap) in list(self.active.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.active[key]
            if code == 0 or key in self.stopping:
                target = key in self.stopping
                self.mark_done(
                    key, self.state(key)["steps"] if target else cap, "target" if target else "round"
                )
                print(
                    f"{key[0]} seed {key[1]}: {'stopped at the target' if target else f'at step {cap}'}",
                    flush=True,
                )
            else:
                self.failed.add(key)
                log = (self.run_dir(key) / "train.log").read_text(errors="replace")[-2000:]
                print(f"FAILED {key[0]} seed {key[1]} (exit {code}); the end of its log:\n{log}", flush=True)

    def score_one(self) -> bool:
        for key in self.runs:
            todo = [(s, p) for s, p in checkpoints(self.run_dir(key)) if not self.results.has(*key, s)]
            if not todo:
                continue
            step, path = todo[0]
            row = {
                "option": key[0],
                "seed": key[1],
                "step": step,
                **self.scorer(path, step),
                "ckpt_time": round(path.stat().st_mtime, 1),
            }
            self.results.add(row)
            print(
                f"{key[0]:15s} seed {key[1]} step {step:5d}: fidelity {row['fidelity']:.3f} "
                f"({row['eval_s']} s)",
                flush=True,
            )
            if key in self.active and key not in self.stopping and self.target_met(key):
                print(f"stop {key[0]} seed {key[1]}: two checkpoints >= {self.args.target:.0%}", flush=True)
                self.active[key][0].send_signal(signal.SIGTERM)
                self.stopping.add(key)
            return True
        return False


# -- table and plot -----------------------------------------------------------------------------------------
def steps_to_target(runs: dict[int, list[tuple[int, float]]], target: float) -> tuple[str, str]:
    """("mean (min-max)" over seeds, or "not reached by N"), and the per-seed steps."""
    hits = {seed: reached(curve, target) for seed, curve in runs.items()}
    per_seed = ", ".join(
        f"s{seed}: {hit:,}" if hit else f"s{seed}: not by {runs[seed][-1][0]:,}" for seed, hit in hits.items()
    )
    found = [h for h in hits.values() if h]
    if len(found) == len(hits):
        return spread(found, lambda v: f"{v:,.0f}"), per_seed
    if not found:
        return f"not reached by {min(curve[-1][0] for curve in runs.values()):,}", per_seed
    return f"{len(found)}/{len(hits)} seeds", per_seed


def summary(results: Results, options: list[str], seeds: list[int], target: float) -> str:
    """Steps to the target per option; at the last step every seed of it reached: fidelity (colour / shape /
    background right) and the validation losses by timestep bucket (means over seeds)."""
    header = (
        f"| option | steps to {target:.0%} held-out fidelity: mean (min-max) | per seed | step | fidelity: "
        "mean (min-max) | colour / shape / background | val eps-MSE, t in 4 buckets | val x0-MSE, same |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for option in options:
        runs = {seed: results.curve(option, seed) for seed in seeds if results.curve(option, seed)}
        if not runs:
            lines.append(f"| {option} | not run | | | | | | |")
            continue
        steps, per_seed = steps_to_target(runs, target)
        common = min(curve[-1][0] for curve in runs.values())
        rows = [
            r
            for r in results.rows
            if r["option"] == option and int(r["step"]) == common and int(r["seed"]) in runs
        ]

        def mean(column, rows=rows):
            return sum(float(r[column]) for r in rows) / len(rows)

        def buckets(kind, rows=rows):
            columns = sorted(
                (c for c in rows[0] if c.startswith(f"val_{kind}_t") and rows[0][c]),
                key=lambda c: int(c.rsplit("_t", 1)[1]),
            )
            return " / ".join(f"{mean(c):.3f}" for c in columns)

        fidelity = spread([float(r["fidelity"]) for r in rows], lambda v: f"{v:.1%}")
        lines.append(
            f"| {option} | {steps} | {per_seed} | {common:,} ({len(rows)} seed{'s' * (len(rows) > 1)}) | "
            f"{fidelity} | {mean('color'):.0%} / {mean('shape'):.0%} / {mean('background'):.0%} | "
            f"{buckets('eps')} | {buckets('x0')} |"
        )
    return "\n".join(lines) + "\n\n" + brightness_table(results, options)


def brightness_table(results: Results, options: list[str]) -> str:
    header = (
        "| option | step | black-background samples as dark as real | white-background samples as bright "
        "as real | mean brightness black / white (real) |"
    )
    lines = [header, "|---|---|---|---|---|"]
    for option in options:
        rows = [r for r in results.rows if r["option"] == option and r.get("black_match")]
        if not rows:
            continue
        step = max(int(r["step"]) for r in rows)  # the latest step every seed that has it
        rows = [r for r in rows if int(r["step"]) == step]

        def mean(key, rows=rows):
            return sum(float(r[key]) for r in rows) / len(rows)

        lines.append(
            f"| {option} | {step:,} ({len(rows)} seed{'s' if len(rows) > 1 else ''}) | "
            f"{mean('black_match'):.1%} | {mean('white_match'):.1%} | {mean('black_mean'):.0f} / "
            f"{mean('white_mean'):.0f} ({mean('black_real_mean'):.0f} / {mean('white_real_mean'):.0f}) |"
        )
    return "\n".join(lines) + "\n"


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def draw(results: Results, options: list[str], seeds: list[int], target: float, path: Path) -> Path:
    """Fidelity vs step per option: the mean over seeds as a line, min-max over seeds as a band."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 1100, 600, 80, 240, 50, 60
    font = ImageFont.load_default(size=15)
    steps = [s for o in options for seed in seeds for s, _ in results.curve(o, seed)] or [1]
    x_max = max(steps)

    def xy(step, value):
        return (left + step / x_max * (width - left - right), top + (1 - value) * (height - top - bottom))

    canvas = Image.new("RGBA", (width, height), "white")
    axes = ImageDraw.Draw(canvas)
    for value in np.linspace(0, 1, 6):
        axes.line([xy(0, value), xy(x_max, value)], fill=(225, 225, 225))
        axes.text((left - 8, xy(0, value)[1]), f"{value:.0%}", fill="black", font=font, anchor="rm")
    ticks = sorted({0, *steps}) if len(set(steps)) <= 12 else np.linspace(0, x_max, 5)
    for step in ticks:
        axes.text((xy(step, 0)[0], height - bottom + 8), f"{step:,.0f}", fill="black", font=font, anchor="mt")
    x0, y_target = xy(0, target)
    for x in range(int(x0), int(xy(x_max, target)[0]), 12):
        axes.line([(x, y_target), (x + 6, y_target)], fill=(120, 120, 120), width=1)
    axes.rectangle([xy(0, 1), xy(x_max, 0)], outline="black")
    axes.text(
        ((left + width - right) / 2, height - 22), "training step", fill="black", font=font, anchor="mm"
    )
    axes.text(
        ((left + width - right) / 2, 22),
        f"held-out prompt fidelity (DPM++ 2M 20 steps) vs step; mean and min-max over "
        f"seeds; dashed: {target:.0%}",
        fill="black",
        font=font,
        anchor="mm",
    )
    for i, option in enumerate(options):
        colour = COLOURS[i % len(COLOURS)]
        by_step: dict[int, list[float]] = {}
        for seed in seeds:
            for step, value in results.curve(option, seed):
                by_step.setdefault(step, []).append(value)
        if not by_step:
            continue
        ordered = sorted(by_step)
        band = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        outline = [xy(s, max(by_step[s])) for s in ordered] + [
            xy(s, min(by_step[s])) for s in reversed(ordered)
        ]
        if len(ordered) > 1:
            ImageDraw.Draw(band).polygon(outline, fill=(*colour, 50))
        canvas = Image.alpha_composite(canvas, band)
        pen = ImageDraw.Draw(canvas)
        line = [xy(s, sum(by_step[s]) / len(by_step[s])) for s in ordered]
        if len(line) > 1:
            pen.line(line, fill=colour, width=3)
        for point in line:
            pen.ellipse([point[0] - 3, point[1] - 3, point[0] + 3, point[1] + 3], fill=colour)
        n_seeds = max(len(v) for v in by_step.values())
        y = top + 12 + 22 * i  # the legend right of the plot
        pen.line([(width - right + 14, y), (width - right + 44, y)], fill=colour, width=3)
        pen.text(
            (width - right + 52, y),
            f"{option} ({n_seeds} seed{'s' if n_seeds > 1 else ''})",
            fill="black",
            font=font,
            anchor="lm",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    canvas.convert("RGB").save(buffer, format="PNG")
    from ldm.utils.files import atomic_write

    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))


def collect(args, results: Results) -> str:
    table = summary(results, args.options, args.seeds, args.target)
    atomic_write_text(Path(args.out) / "convergence.md", table)
    png = draw(
        results, args.options, args.seeds, args.target, Path(args.png or Path(args.out) / "convergence.png")
    )
    print(f"\n{table}\nwrote {png} and {Path(args.out) / 'convergence.md'}", flush=True)
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="convergence_out", help="runs, the VAE and convergence.csv go here")
    p.add_argument("--png", default=None, help="the plot (default <out>/convergence.png)")
    p.add_argument("--vae", default=None, help="reuse this VAE checkpoint instead of training one")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma list from {list(OPTIONS)}")
    p.add_argument("--seeds", default="0,1")
    p.add_argument(
        "--steps", type=int, default=2000, help="the LR schedule's length (warm-up, cosine to 0.1x)"
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="train runs only this far in this session "
        "(default --steps; a later session with a larger one continues them)",
    )
    p.add_argument("--round", type=int, default=500, help="steps each run advances per round")
    p.add_argument(
        "--order",
        choices=("seed", "round"),
        default="seed",
        help="seed: seed 0 of every option to "
        "--max-steps first, then seed 1, ...; round: all runs advance round by round",
    )
    p.add_argument("--every", type=int, default=250, help="checkpoint and score every N steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--n", type=int, default=90, help="held-out prompts per fidelity score")
    p.add_argument("--sampler-steps", type=int, default=20)
    p.add_argument("--val-n", type=int, default=256, help="validation images for the t-bucket losses")
    p.add_argument("--brightness-n", type=int, default=90, help="samples (half black, half white background)")
    p.add_argument("--brightness-every", type=int, default=500, help="steps; 0: never")
    p.add_argument("--jobs", type=int, default=2, help="training processes at a time (one thread each)")
    p.add_argument("--nice", type=int, default=19)
    p.add_argument("--poll", type=float, default=15.0, help="seconds between looks at the runs")
    p.add_argument("--override", action="append", default=[], help="extra train.py override for txt2img runs")
    p.add_argument("--vae-override", action="append", default=[], help="extra train.py override for the VAE")
    p.add_argument("--collect", action="store_true", help="only print the table and draw the plot")
    args = p.parse_args(argv)
    args.options = args.options.split(",")
    unknown = [o for o in args.options if o not in OPTIONS]
    if unknown:
        p.error(f"--options: unknown {unknown}; choose from {list(OPTIONS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.max_steps = args.max_steps or args.steps
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / "convergence.csv")
    launched = 0
    if not args.collect:
        torch.set_num_threads(1)
        if args.nice:
            os.nice(args.nice)
        started = time.time()
        vae = Path(args.vae) if args.vae else train_vae(args)
        grid = Grid(args, vae.resolve(), results, Scorer(args))
        grid.loop()
        launched = grid.launched
        print(
            f"grid finished in {time.time() - started:.0f} s ({launched} training runs started)", flush=True
        )
    table = collect(args, results)
    return {"rows": results.rows, "launched": launched, "table": table}


if __name__ == "__main__":
    run_main(main)
