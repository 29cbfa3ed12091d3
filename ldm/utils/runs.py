"""Find runs and checkpoints on disk: ``ckpt_path=last`` and "the latest VAE run"."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from omegaconf import OmegaConf

_RUN_SUFFIX = secrets.token_hex(3)


def run_suffix() -> str:
    """Six random hex digits, fixed for this process: run folders are ``<date>_<time>_<suffix>``, so two runs
    started in the same second never share one (DDP workers get the parent's folder from Lightning)."""
    return _RUN_SUFFIX


def register_resolvers() -> None:
    """``${run_suffix:}`` for ``conf/hydra``; call before Hydra composes the config."""
    if not OmegaConf.has_resolver("run_suffix"):
        OmegaConf.register_new_resolver("run_suffix", run_suffix)


def latest_checkpoint(log_dir: str | Path, task_name: str, filename: str = "last.ckpt") -> Path | None:
    """Newest ``<log_dir>/<task_name>/runs/*/checkpoints/<filename>`` by modification time, or None."""
    runs = Path(log_dir) / task_name / "runs"
    found = sorted(runs.glob(f"*/checkpoints/{filename}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _last_activity(run: Path) -> float:
    """When a run last showed life: its folder's mtime (entries created in it: logs, .hydra, checkpoints/) or
    its last.ckpt's, whichever is newer."""
    last = run / "checkpoints" / "last.ckpt"
    return max(run.stat().st_mtime, last.stat().st_mtime if last.exists() else 0.0)


def _was_a_resume(run: Path) -> bool:
    """The run's saved config (Hydra's ``.hydra/config.yaml``) has a ``ckpt_path``: without a checkpoint of
    its own, it continued one of the older runs and saved nothing new (or died first): not a run of its
    own."""
    saved = run / ".hydra" / "config.yaml"
    try:
        return saved.is_file() and OmegaConf.load(saved).get("ckpt_path") is not None
    except Exception:  # noqa: BLE001 - an unreadable config says nothing; the run counts
        return False


def last_run_checkpoint(log_dir: str | Path, task_name: str, current_run: str | Path | None = None) -> Path:
    """``ckpt_path=last``: the last.ckpt of this task's newest run (the current run's own folder counts only
    once it has one: resumed into itself; a resume that saved nothing is skipped). Refuses, naming the fix,
    when that newest run has no checkpoint (it died before its first save): continuing an older run instead
    is rarely what was meant."""
    runs_dir = Path(log_dir) / task_name / "runs"
    current = Path(current_run).resolve() if current_run else None
    runs = [
        run
        for run in (runs_dir.iterdir() if runs_dir.is_dir() else [])
        if run.is_dir() and (run.resolve() != current or (run / "checkpoints" / "last.ckpt").exists())
    ]
    runs = [run for run in runs if (run / "checkpoints" / "last.ckpt").exists() or not _was_a_resume(run)]
    with_ckpt = sorted(
        (run for run in runs if (run / "checkpoints" / "last.ckpt").exists()), key=_last_activity
    )
    if not with_ckpt:
        raise FileNotFoundError(
            f"ckpt_path=last: no {runs_dir}/*/checkpoints/last.ckpt exists yet. "
            f"Train once without ckpt_path (task_name={task_name}), or pass ckpt_path=<file>."
        )
    newest = max(runs, key=lambda run: (_last_activity(run), run in with_ckpt))
    older = with_ckpt[-1] / "checkpoints" / "last.ckpt"
    if newest != with_ckpt[-1]:
        raise FileNotFoundError(
            f"ckpt_path=last: the newest {task_name} run, {newest}, has no checkpoint (it stopped before its "
            f"first save); the newest run with one is {with_ckpt[-1].name}. To continue that run pass "
            f"ckpt_path={older}; to start afresh leave ckpt_path out."
        )
    return older


def describe_resume(ckpt_path: str, task_name: str) -> str:
    """The line train.py logs for ``ckpt_path=last``: which run it continues, from which file, written
    when."""
    found = Path(ckpt_path)
    written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found.stat().st_mtime))
    return (
        f"ckpt_path=last: continuing run {found.parent.parent.name} of {task_name} "
        f"({found}, written {written})"
    )


def resolve_ckpt_path(
    ckpt_path: str | None, log_dir: str | Path, task_name: str, current_run: str | Path | None = None
) -> str | None:
    """``None`` -> None; ``"last"`` -> the newest run's last.ckpt (``last_run_checkpoint``); a path must
    exist."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        return str(last_run_checkpoint(log_dir, task_name, current_run))
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist (cwd: {os.getcwd()})")
    return str(ckpt_path)


def configure_wandb_mode() -> str:
    """wandb never prompts: offline unless WANDB_MODE is set or credentials are present."""
    if "WANDB_MODE" not in os.environ:
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        has_netrc = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
        os.environ["WANDB_MODE"] = "online" if (os.environ.get("WANDB_API_KEY") or has_netrc) else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    return os.environ["WANDB_MODE"]
