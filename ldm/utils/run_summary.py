"""The few lines a run ends with: how far it got, how it did, where its files are, what to run next."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def _fmt_time(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _fmt_value(value) -> str:
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return f"{value:.4g}"


def finished_steps(trainer, last: Path | None) -> int:
    """``trainer.global_step``; under ``ddp_spawn`` / ``ddp_fork`` the workers trained and this process's
    trainer never stepped: then the step of the last checkpoint they wrote (memory-mapped: no weights
    read)."""
    if trainer.global_step or last is None or not last.is_file():
        return trainer.global_step
    if type(getattr(trainer.strategy, "launcher", None)).__name__ != "_MultiProcessingLauncher":
        return trainer.global_step
    return int(torch.load(last, map_location="cpu", mmap=True, weights_only=True).get("global_step", 0))


def stop_reason(trainer, steps: int | None = None) -> str:
    steps = trainer.global_step if steps is None else steps
    if trainer.interrupted:
        return "interrupted"
    if trainer.fast_dev_run:
        return "fast_dev_run"
    if trainer.max_steps and trainer.max_steps > 0 and steps >= trainer.max_steps:
        return "max_steps reached"
    timer = next((c for c in trainer.callbacks if type(c).__name__ == "Timer"), None)
    if timer is not None and (timer.time_remaining() or 0) <= 0:
        return "max_time reached"
    if trainer.max_epochs and trainer.max_epochs > 0 and trainer.current_epoch >= trainer.max_epochs:
        return "max_epochs reached"
    return "stopped early"


def guard_line(trainer, steps: int, reason: str) -> str | None:
    """When ``trainer.max_time`` (the guard) stopped a run before ``max_steps`` (the budget that defines its
    result): how far it got, and how to finish it (the checkpoint holds the elapsed time: resuming with the
    same ``max_time`` would stop at once)."""
    if reason != "max_time reached" or not (trainer.max_steps and trainer.max_steps > 0):
        return None
    return (
        f"stopped at {steps:,} of {trainer.max_steps:,} steps: max_time ran out first (the machine was busy, "
        "or slower than the budget assumes); resume with the same command plus `ckpt_path=last "
        "trainer.max_time=null`"
    )


def best_line(trainer, run_dir: Path) -> str | None:
    ckpt = trainer.checkpoint_callback
    if ckpt is None or not ckpt.monitor or ckpt.best_model_score is None:
        return None
    where = Path(ckpt.best_model_path) if ckpt.best_model_path else None
    line = f"best {ckpt.monitor} {_fmt_value(ckpt.best_model_score)}"
    if where is not None:
        inside = run_dir in where.resolve().parents
        line += f" ({where}" + ("" if inside else ", written by the run this one resumed from") + ")"
    return line


def final_export(files: list[Path]) -> Path:
    """The run's last export among ``files``: the fit-end file (``<name>.safetensors``), else the
    intermediate one (``<name>-step000200.safetensors``) of the highest step; ties by modification time."""

    def order(path: Path) -> tuple:
        step = re.search(r"-step(\d+)$", path.stem)
        return (step is None, int(step.group(1)) if step else 0, path.stat().st_mtime)

    return max(files, key=order)


def next_command(model, cfg, last_ckpt: Path, run_dir: Path) -> str | None:
    """What a user would run next after this kind of model (None when nothing obvious)."""
    if hasattr(model, "vae") and not hasattr(model, "unet"):  # a VAE run
        return f"python train.py experiment=txt2img model.vae_ckpt={last_ckpt}"
    export = getattr(getattr(model, "hparams", None), "export_dir", None) if hasattr(model, "clip") else None
    if export:  # experiment=clip: txt2img conditions on its frozen text tower
        return f"python train.py experiment=txt2img model.conditioner.embedders.0.module.path={export}"
    adapters = sorted((run_dir / "adapters").glob("*.safetensors")) if (run_dir / "adapters").is_dir() else []
    prompt = (list(cfg.model.get("log_prompts") or []) or ["..."])[0]
    lora = [a for a in adapters if "lora" in a.name.lower()]
    if lora:  # the exported file on its base, as other tools will use it
        base = cfg.model.get("base") or "last"
        return f'python sample.py --ckpt {base} --lora {final_export(lora)} --prompt "{prompt}"'
    if hasattr(model, "generate"):  # txt2img, or any fine-tune checkpoint (rebuilt from its base + method)
        return f'python sample.py --ckpt {last_ckpt} --prompt "{prompt}"'
    return None


def summarize_run(trainer, model, cfg, seconds: float) -> str:
    """A short multi-line summary of a finished fit (see the module docstring)."""
    run_dir = Path(cfg.paths.output_dir).resolve()
    ckpt = trainer.checkpoint_callback
    last = Path(ckpt.dirpath) / "last.ckpt" if ckpt is not None and ckpt.dirpath else None
    steps = finished_steps(trainer, last)
    reason = stop_reason(trainer, steps)
    lines = [f"Run summary ({cfg.task_name}): {steps} steps in {_fmt_time(seconds)} ({reason})"]
    guard = guard_line(trainer, steps, reason)
    if guard:
        lines.append(f"  {guard}")
    clock = getattr(model, "compile_clock", None)  # model.compile: what the compile cost
    if clock is not None:
        lines.append(f"  {clock.summary()}")
    for callback in trainer.callbacks:  # the thread policy, when it adapted to the machine's load
        if hasattr(callback, "thread_summary"):
            lines.append(f"  {callback.thread_summary()}")
    metrics = {k: v for k, v in trainer.callback_metrics.items() if "/" in k and not k.endswith("_step")}
    if metrics:
        lines.append("  final: " + ", ".join(f"{k} {_fmt_value(v)}" for k, v in sorted(metrics.items())))
    best = best_line(trainer, run_dir)
    if best:
        lines.append(f"  {best}")
    if last is not None and last.is_file():
        lines.append(f"  checkpoint: {last}")
    images = run_dir / "images"
    if images.is_dir():
        lines.append(f"  images: {images}")
    if last is not None and last.is_file():
        command = next_command(model, cfg, last, run_dir)
        if command:
            lines.append(f"  next: {command}")
    return "\n".join(lines)
