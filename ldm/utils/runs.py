"""Find runs and checkpoints on disk: ``ckpt_path=last`` and "the latest VAE run"."""

from __future__ import annotations

import os
import secrets
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


def resolve_ckpt_path(ckpt_path: str | None, log_dir: str | Path, task_name: str) -> str | None:
    """``None`` -> None; ``"last"`` -> the newest last.ckpt of this task; a path must exist."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        found = latest_checkpoint(log_dir, task_name)
        if found is None:
            raise FileNotFoundError(
                f"ckpt_path=last: no {Path(log_dir) / task_name / 'runs'}/*/checkpoints/last.ckpt exists yet. "
                f"Train once without ckpt_path (task_name={task_name}), or pass ckpt_path=<file>."
            )
        return str(found)
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
