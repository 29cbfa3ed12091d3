"""Optimisers with train / eval modes (schedule-free AdamW): the weights gradients are taken at (y) are not
the weights to evaluate and keep (x, an average), and ``optimizer.train()`` / ``optimizer.eval()`` move the
parameters between the two. The LightningModule follows its own mode: ``model.train()`` (training steps)
puts such optimisers in train mode, ``model.eval()`` (validation, sampling) in eval mode, and checkpoints are
written from eval mode, so validation, samples, exports and saved weights are x. Any other optimiser has no
such methods and is left alone."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _leaves(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The optimiser, or the per-parameter ones inside a wrapper (``OptimizerInBackward``,
    ``StochasticRoundingOptimizer``)."""
    inner = getattr(optimizer, "inner", None)
    slots = getattr(optimizer, "_slots", None)
    if isinstance(inner, list):
        yield from inner
    elif isinstance(slots, list):
        yield from (slot[2] for slot in slots)
    else:
        yield optimizer


def has_modes(optimizer) -> bool:
    return all(
        callable(getattr(leaf, name, None)) for leaf in _leaves(optimizer) for name in ("train", "eval")
    )


def in_train_mode(optimizer) -> bool:
    return any(group.get("train_mode", False) for leaf in _leaves(optimizer) for group in leaf.param_groups)


def set_mode(optimizers, train: bool) -> bool:
    """``train()`` or ``eval()`` on every optimiser that has modes; True if any has them."""
    found = False
    for optimizer in optimizers:
        if has_modes(optimizer):
            found = True
            for leaf in _leaves(optimizer):
                leaf.train() if train else leaf.eval()
    return found


def trainer_optimizers(module) -> list:
    """The module's optimisers once a trainer has built them, else []."""
    trainer = getattr(module, "_trainer", None)
    return list(getattr(trainer, "optimizers", None) or []) if trainer is not None else []


def save_in_eval_mode(module, checkpoint: dict) -> None:
    """A checkpoint written while a mode-switching optimiser is in train mode (a save from a training-step
    hook, a signal): the optimiser goes to eval mode and the parameters and optimiser states are collected
    again. It stays there until the next training step switches it back (the same round trip in a resumed
    run, which loads x and switches at its first step: resume stays exact). Saves after validation are already
    in eval mode."""
    optimizers = [o for o in trainer_optimizers(module) if has_modes(o) and in_train_mode(o)]
    if not optimizers:
        return
    set_mode(optimizers, train=False)
    if "optimizer_states" in checkpoint:
        checkpoint["optimizer_states"] = [o.state_dict() for o in trainer_optimizers(module)]
    if "state_dict" in checkpoint:
        checkpoint["state_dict"] = {k: v.detach().clone() for k, v in module.state_dict().items()}
