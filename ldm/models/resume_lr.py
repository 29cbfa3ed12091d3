"""A learning rate given at resume applies.

Lightning restores each optimiser's and scheduler's state from the checkpoint, learning rates included, so
``model.optimizer.lr=...`` (or a method's own rate, e.g. DreamBooth's text-encoder lr) passed with
``ckpt_path=...`` changed nothing: the NaN advice ("lower the lr and resume") ran into the same NaN. The
module records the rates it was configured with when fit starts (optimisers built, checkpoint not yet
restored) and, after the restore, puts back each rate that differs from the checkpoint's: the group's
``lr`` (scaled, so a schedule keeps its place), ``initial_lr`` and the scheduler's ``base_lrs``. A rate the
command line did not change equals the checkpoint's and nothing is touched (exact resume stays exact).
"""

from __future__ import annotations

from ldm.utils.logging import get_logger

log = get_logger(__name__)


def _base_lrs(trainer, optimizer) -> list[float]:
    """The optimiser's per-group base rates: its scheduler's ``base_lrs``, else the groups' ``lr``."""
    for config in trainer.lr_scheduler_configs:
        if config.scheduler.optimizer is optimizer and hasattr(config.scheduler, "base_lrs"):
            return [float(lr) for lr in config.scheduler.base_lrs]
    return [float(group["lr"]) for group in optimizer.param_groups]


def configured_lrs(trainer) -> list[list[float]]:
    """Each optimiser's per-group base rates as configured (call in ``on_fit_start``: before the restore)."""
    return [_base_lrs(trainer, optimizer) for optimizer in trainer.optimizers]


def _set_base_lr(trainer, optimizer, index: int, new: float, old: float) -> None:
    group = optimizer.param_groups[index]
    group["lr"] = group["lr"] * (new / old) if old else new  # where the schedule is now, at the new base
    if "initial_lr" in group:
        group["initial_lr"] = new
    for config in trainer.lr_scheduler_configs:
        if config.scheduler.optimizer is optimizer and hasattr(config.scheduler, "base_lrs"):
            config.scheduler.base_lrs[index] = new


def apply_configured_lrs(trainer, configured: list[list[float]] | None) -> list[tuple[str, float, float]]:
    """After a resume (``on_train_start``): the configured rates that differ from the checkpoint's replace
    them, each change logged. Returns (group, new, old) per change."""
    if not configured or not trainer.ckpt_path:
        return []
    changed = []
    for k, (optimizer, lrs) in enumerate(zip(trainer.optimizers, configured)):
        for index, (new, old) in enumerate(zip(lrs, _base_lrs(trainer, optimizer))):
            if new == old:
                continue
            _set_base_lr(trainer, optimizer, index, new, old)
            name = optimizer.param_groups[index].get("name") or f"group {index}"
            where = f"{name}" + (f" of optimizer {k}" if len(trainer.optimizers) > 1 else "")
            log.warning(
                f"resuming with lr {new:g} instead of the checkpoint's {old:g} ({where}): the run "
                "continues from the checkpoint but will not equal an uninterrupted run"
            )
            changed.append((where, new, old))
    return changed
