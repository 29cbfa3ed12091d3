"""Is the loss curve unchanged with the memory savers on? A full-UNet fine-tune of the embedded task
(``experiment=lora_finetune model/method=full``, from the trained txt2img base) with each saver on, from the
same seed, against the same run with the savers off and against a second seed.

Exact savers (gradient checkpointing, optimiser step in backward, EMA kept on CPU) must give the same curve up
to float noise; approximate ones (Adafactor, AdamW 8-bit when bitsandbytes is installed, bf16 weights with
stochastic rounding, bf16 autocast) are compared with the seed-to-seed difference. Each run is its own
``train.py`` process; per-step training losses come from its CSV log, plus the validation loss at the end
(fixed timesteps and noise).

    python benchmarks/savers_curve.py --base <txt2img last.ckpt>            # 200 steps per run
    python benchmarks/savers_curve.py --base ... --steps 20 --variants baseline +ckpt   # quick look
Prints one markdown table and writes ``--json`` if given.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ldm.utils.task import run_main

VARIANTS = {  # name -> (overrides, exact?)
    "baseline": ([], True),
    "seed 2": (["seed=2"], None),
    "+ckpt": (["model.gradient_checkpointing=true"], True),
    "+in_backward": (["model.optimizer_in_backward=true"], True),
    "+ema_cpu": (["model.ema_decay=0.999", "model.ema_device=cpu"], True),
    "+adafactor": (["model/optimizer=adafactor"], False),
    "+adamw8bit": (["model/optimizer=adamw8bit"], False),
    "+bf16_weights": (["model.bf16_weights=true"], False),
    "+bf16_mixed": (["trainer.precision=bf16-mixed"], False),
}


def run(variant: str, base: str, steps: int, batch: int, lr: float, out: Path) -> dict:
    """One training run; its per-step losses and the final validation loss."""
    overrides = [
        "experiment=lora_finetune",
        "model/method=full",
        f"model.base={base}",
        f"trainer.max_steps={steps}",
        f"model.optimizer.lr={lr}",
        f"data.batch_size={batch}",
        "data.cache_dir=null",
        "logger=csv",
        "trainer.log_every_n_steps=1",
        f"trainer.val_check_interval={steps}",
        "+trainer.limit_val_batches=2",
        "trainer.max_time=null",
        "callbacks.image_logger=null",
        "callbacks.rich_progress_bar=null",
        "callbacks.adapter_export=null",
        "callbacks.model_checkpoint=null",
        "extras.print_config=false",
        "model.scheduler.warmup_steps=10",
        f"hydra.run.dir={out}",
        *VARIANTS[variant][0],
    ]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    if result.returncode != 0:
        return {"variant": variant, "error": (result.stderr or result.stdout)[-1500:]}
    return {**read_run(variant, out), "seconds": round(time.perf_counter() - start, 1)}


def read_run(variant: str, out: Path) -> dict:
    """Per-step training losses and the last validation loss from a run's CSV log."""
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    return {
        "variant": variant,
        "losses": [losses[k] for k in sorted(losses)],
        "val_loss": val[-1] if val else None,
        "seconds": math.nan,
    }


def summarise(rows: list[dict], window: int) -> list[dict]:
    base = rows[0]["losses"]

    def tail(losses: list[float]) -> float:
        return sum(losses[-window:]) / len(losses[-window:])

    table = []
    for row in rows:
        if "error" in row:
            table.append({"variant": row["variant"], "error": row["error"].strip().splitlines()[-1]})
            continue
        losses = row["losses"]
        diffs = [abs(a - b) for a, b in zip(losses, base)]
        table.append(
            {
                "variant": row["variant"],
                "steps": len(losses),
                "max_step_diff": max(diffs),
                "tail_loss": tail(losses),
                "tail_diff": tail(losses) - tail(base),
                "val_loss": row["val_loss"],
                "val_diff": (row["val_loss"] - rows[0]["val_loss"])
                if row["val_loss"] is not None
                else math.nan,
                "seconds": row["seconds"],
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="the embedded txt2img checkpoint (model.base)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4, help="DreamBooth's full fine-tune learning rate")
    parser.add_argument("--window", type=int, default=50, help="last steps averaged for the tail loss")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--runs-dir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument(
        "--summarise-only", action="store_true", help="only read the finished runs in --runs-dir"
    )
    args = parser.parse_args()
    variants = ["baseline", *[v for v in args.variants if v != "baseline"]]
    os.environ.setdefault("WANDB_MODE", "offline")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.runs_dir or tmp)
        for variant in variants:
            out = folder / variant.strip("+ ")
            if args.summarise_only:
                finished = read_run(variant, out) if any(out.rglob("metrics.csv")) else {}
                if finished.get("val_loss") is not None:  # runs still going have no final validation yet
                    rows.append(finished)
                continue
            rows.append(run(variant, args.base, args.steps, args.batch, args.lr, out))
            print(
                f"{variant}: "
                + (rows[-1].get("error", "").strip().splitlines()[-1:] or [f"{rows[-1]['seconds']} s"])[0],
                flush=True,
            )
    if not rows or "error" in rows[0]:
        raise SystemExit(f"the baseline run failed or is missing:\n{rows[0]['error'] if rows else ''}")
    table = summarise(rows, args.window)
    seed = next((r for r in table if r["variant"] == "seed 2" and "error" not in r), None)
    print(
        f"\nfull UNet fine-tune of the embedded task, {args.steps} steps, batch {args.batch}, lr {args.lr}; "
        "differences against the baseline "
        f"(same seed){'' if seed is None else ', seed 2 = seed-to-seed noise'}"
    )
    print(
        f"| run | max per-step loss diff | mean loss, last {args.window} steps (diff) | final val loss "
        "(diff) | time |"
    )
    print("|---|---|---|---|---|")
    for r in table:
        if "error" in r:
            print(f"| {r['variant']} | not run: {r['error'][:90]} | | | |")
            continue
        print(
            f"| {r['variant']} | {r['max_step_diff']:.2e} | {r['tail_loss']:.5f} ({r['tail_diff']:+.5f}) | "
            f"{r['val_loss']:.5f} ({r['val_diff']:+.5f}) | {r['seconds']:.0f} s |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": rows, "table": table}, indent=2))


if __name__ == "__main__":
    run_main(main)
