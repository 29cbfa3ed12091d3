"""What the resumable benchmark grids share (``benchmarks/convergence.py``: txt2img objectives,
``benchmarks/methods.py``: fine-tuning methods): ``train.py`` runs as niced one-thread child processes,
resuming from the checkpoint with the highest step, and one CSV of results rewritten atomically per row."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ldm.utils.files import atomic_write_text

CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "WANDB_MODE": "offline",
    "HYDRA_FULL_ERROR": "1",
}


# -- child processes ----------------------------------------------------------------------------------------
def launch(argv: list[str], log: Path, nice: int, threads: int = 1):
    """``python train.py <argv>`` in the background (a Popen: ``poll()``, ``send_signal()``), output to
    ``log``."""
    cmd = [sys.executable, str(ROOT / "train.py"), *argv]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    with log.open("a") as handle:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)},
        )


def common_overrides(run_dir: Path) -> list[str]:
    return [
        "trainer.max_time=null",
        "logger=csv",
        "callbacks.image_logger=null",
        "callbacks.rich_progress_bar=null",
        "extras.print_config=false",
        f"hydra.run.dir={run_dir}",
    ]


def global_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))


def resume_override(run_dir: Path) -> list[str]:
    """``ckpt_path=`` the run's checkpoint with the highest global step (the newest of those). Not
    ``last.ckpt`` by name: a run resumed from a ``last.ckpt`` that was linked to its first checkpoint writes
    ``last-v1.ckpt``
    (Lightning's version counter), and the next resume from ``last.ckpt`` would go back to the old state."""
    found = [(global_step(p), p.stat().st_mtime, p) for p in (run_dir / "checkpoints").glob("*.ckpt")]
    return [f"ckpt_path={max(found)[2]}"] if found else []


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, file) of the run's step checkpoints (``step_000500.ckpt``; a second save of a step, ``-v1``, is
    the same state of an exact resume, skipped)."""
    found = ((p.stem.split("_")[1], p) for p in (run_dir / "checkpoints").glob("step_*.ckpt"))
    return sorted((int(step), p) for step, p in found if step.isdigit())


# -- results ------------------------------------------------------------------------------------------------
class Results:
    """The CSV of every result, a row per (``key`` column, seed, step), rewritten atomically on each new
    row; a new row for a (name, seed, step) that has one replaces it."""

    def __init__(self, path: Path, key: str = "option"):
        self.path, self.key = path, key
        self.rows = list(csv.DictReader(path.open())) if path.is_file() else []

    def find(self, name: str, seed: int, step: int) -> dict | None:
        return next(
            (
                r
                for r in self.rows
                if r[self.key] == name and int(r["seed"]) == seed and int(r["step"]) == step
            ),
            None,
        )

    def has(self, name: str, seed: int, step: int) -> bool:
        return self.find(name, seed, step) is not None

    def add(self, row: dict) -> None:
        old = self.find(str(row[self.key]), int(row["seed"]), int(row["step"]))
        if old is not None:
            self.rows.remove(old)
        self.rows.append({k: str(v) for k, v in row.items()})
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def curve(self, name: str, seed: int, column: str = "fidelity") -> list[tuple[int, float]]:
        return sorted(
            (int(r["step"]), float(r[column]))
            for r in self.rows
            if r[self.key] == name and int(r["seed"]) == seed and r.get(column)
        )


def reached(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first checkpoint step that scores >= target, or None."""
    return next((step for step, value in curve if value >= target), None)


def spread(values: list[float], fmt) -> str:
    if not values:
        return "-"
    mean = fmt(sum(values) / len(values))
    return mean if len(values) == 1 else f"{mean} ({fmt(min(values))}-{fmt(max(values))})"
