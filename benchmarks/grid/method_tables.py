"""The tables of ``benchmarks/methods.py`` (markdown, mean and min-max over seeds) from its two CSVs, and the
rank agreement (Spearman) between CLIP-T / CLIP-I / DINO and the exact evaluator over every scored run."""

from __future__ import annotations

import math

import torch
from torchmetrics.functional import spearman_corrcoef

from benchmarks.grid.runs import Results, reached, spread

METRICS = (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino", "DINO"))


def pct(v: float) -> str:
    return f"{v:.1%}"


def latest_rows(results: Results, run: str, seeds: list[int]) -> list[dict]:
    """Per seed, the row of its highest step (a run continued with a larger budget was scored again)."""
    rows = []
    for seed in seeds:
        mine = [r for r in results.rows if r["run"] == run and int(r["seed"]) == seed]
        if mine:
            rows.append(max(mine, key=lambda r: int(r["step"])))
    return rows


def cell(rows: list[dict], column: str, fmt=pct) -> str:
    values = [float(r[column]) for r in rows if r.get(column) not in (None, "")]
    return spread(values, fmt) if values else "-"


def with_base(rows: list[dict], column: str) -> str:
    return f"{cell(rows, column)} (base {cell(rows, 'base_' + column)})"


def star_table(args, arms, results: Results) -> str:
    head = (
        "| arm | settings | seeds | steps | star fidelity (colour+shape) | colour / shape / background "
        "| known prompts | trainable params | file KiB | s/step | peak RSS MiB | CLIP-T | CLIP-I | DINO |"
    )
    lines = [head, "|" + "---|" * 14]
    for name in args.arms:
        arm = arms[name]
        if arm.kind != "star":
            continue
        rows = latest_rows(results, arm.run, args.seeds)
        if not rows:
            lines.append(f"| {name} | {arm.note} | not run |" + " |" * 11)
            continue
        cells = [
            cell(rows, "step", lambda v: f"{v:,.0f}"),
            cell(rows, "fidelity"),
            " / ".join(cell(rows, c, lambda v: f"{v:.0%}") for c in ("color", "shape", "background")),
            with_base(rows, "known_fidelity"),
            cell(rows, "params", lambda v: f"{v:,.0f}"),
            cell(rows, "file_kib", lambda v: f"{v:,.0f}"),
            cell(rows, "s_per_step", lambda v: f"{v:.3f}"),
            cell(rows, "peak_rss_mib", lambda v: f"{v:,.0f}"),
            *(cell(rows, c, lambda v: f"{v:.3f}") for c, _ in METRICS),
        ]
        lines.append(f"| {name} | {arm.note} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def subject_table(args, arms, results: Results) -> str:
    head = (
        "| arm | settings | seeds | steps | subject on unseen backgrounds | right background there "
        "| class prompts: fidelity | class prompts read as the subject | known prompts: fidelity "
        "| CLIP-T | CLIP-I | DINO |"
    )
    lines = [head, "|" + "---|" * 12]
    for name in args.arms:
        arm = arms[name]
        if arm.kind != "subject":
            continue
        rows = latest_rows(results, arm.run, args.seeds)
        if not rows:
            lines.append(f"| {name} | {arm.note} | not run |" + " |" * 9)
            continue
        each = sorted(c for c in rows[0] if c.startswith("subject_rate_") and any(r.get(c) for r in rows))
        subject = cell(rows, "subject_subject_rate")
        if each:
            subject += " (" + ", ".join(f"{c[len('subject_rate_') :]} {cell(rows, c)}" for c in each) + ")"
        cells = [
            cell(rows, "step", lambda v: f"{v:,.0f}"),
            subject,
            cell(rows, "background_acc"),
            with_base(rows, "class_fidelity"),
            with_base(rows, "class_subject_rate"),
            with_base(rows, "known_fidelity"),
            *(cell(rows, c, lambda v: f"{v:.3f}") for c, _ in METRICS),
        ]
        lines.append(f"| {name} | {arm.note} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def instance_table(args, arms, results: Results) -> str:
    """Runs whose instance captions name no background (one instance background): what the caption as
    trained draws: the subject, and the instance images' background copied or not."""
    head = (
        "| arm | settings | seeds | the caption as trained: read as the subject | on the instance background "
        "| subject on unseen backgrounds (named) | right background there |"
    )
    lines = [head, "|" + "---|" * 7]
    for name in args.arms:
        rows = latest_rows(results, arms[name].run, args.seeds)
        if arms[name].kind != "subject" or not any(r.get("instance_background") for r in rows):
            continue
        cells = [
            with_base(rows, "instance_subject_rate"),
            with_base(rows, "instance_background"),
            cell(rows, "subject_subject_rate"),
            cell(rows, "background_acc"),
        ]
        lines.append(f"| {name} | {arms[name].note} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def curve_table(args, arms, curves: Results) -> str:
    head = (
        f"| arm | settings | steps to {args.target:.0%} star fidelity: mean (min-max) | per seed "
        "| fidelity at the last export |"
    )
    lines = [head, "|---|---|---|---|---|"]
    for name in args.arms:
        arm = arms[name]
        if not arm.curve:
            continue
        runs = {s: curves.curve(arm.run, s) for s in args.seeds if curves.curve(arm.run, s)}
        if not runs:
            lines.append(f"| {name} | {arm.note} | not run | | |")
            continue
        hits = {s: reached(c, args.target) for s, c in runs.items()}
        per_seed = ", ".join(
            f"s{s}: {h:,}" if h else f"s{s}: not by {runs[s][-1][0]:,}" for s, h in hits.items()
        )
        found = [h for h in hits.values() if h]
        steps = (
            spread(found, lambda v: f"{v:,.0f}")
            if len(found) == len(hits)
            else f"{len(found)}/{len(hits)} seeds"
        )
        last = spread([c[-1][1] for c in runs.values()], pct)
        lines.append(f"| {name} | {arm.note} | {steps} | {per_seed} | {last} |")
    return "\n".join(lines) + "\n"


def spearman(rows: list[dict], column: str) -> tuple[float | None, int]:
    pairs = [(float(r[column]), float(r["exact"])) for r in rows if r.get(column) not in (None, "")]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return None, len(pairs)  # too few runs, or one side constant: no ranking
    values = torch.tensor(pairs, dtype=torch.float64)
    rho = float(spearman_corrcoef(values[:, 0], values[:, 1]))
    return (None if math.isnan(rho) else rho), len(pairs)


def agreement_table(args, arms, results: Results) -> str:
    """Spearman's rho between each metric and the exact evaluator's figure (subject runs: the subject read
    back on unseen backgrounds; star runs: star fidelity) over every scored run and seed of the arms."""
    runs = {arms[name].run: arms[name].kind for name in args.arms}
    rows = [r for run in runs for r in latest_rows(results, run, args.seeds)]
    subject_rows = [r for r in rows if runs[r["run"]] == "subject"]
    lines = [
        "| metric | Spearman rho vs the exact evaluator, all runs | runs | subject runs only | runs |",
        "|---|---|---|---|---|",
    ]
    for column, label in METRICS:
        (rho, n), (rho_s, n_s) = spearman(rows, column), spearman(subject_rows, column)
        if not n:
            continue
        show = [f"{v:+.2f}" if v is not None else "-" for v in (rho, rho_s)]
        lines.append(f"| {label} | {show[0]} | {n} | {show[1]} | {n_s} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def tables(args, arms, results: Results, curves: Results) -> str:
    parts = []
    if any(arms[a].kind == "star" for a in args.arms):
        parts.append("Star (held-out concept) runs:\n\n" + star_table(args, arms, results))
    if any(arms[a].kind == "subject" for a in args.arms):
        parts.append("Subject runs (unseen backgrounds):\n\n" + subject_table(args, arms, results))
    instance = instance_table(args, arms, results)
    if instance:
        parts.append("Instance captions without the background (masked vs unmasked loss):\n\n" + instance)
    if any(arms[a].curve for a in args.arms):
        parts.append(
            "Steps to the fidelity line (an export scored every --every steps):\n\n"
            + curve_table(args, arms, curves)
        )
    agreement = agreement_table(args, arms, results)
    if agreement:
        parts.append("Rank agreement with the exact evaluator:\n\n" + agreement)
    return "\n".join(parts)
