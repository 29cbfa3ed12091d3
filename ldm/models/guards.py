"""Stop training with an actionable message when a loss goes NaN or infinite."""

from __future__ import annotations

import torch


class NonFiniteLossError(FloatingPointError):
    pass


def check_finite(loss: torch.Tensor, module, parts: dict | None = None) -> None:
    """Raise :class:`NonFiniteLossError` naming the step and the loss terms. Checkpoints already written
    stay on disk: resume from the last good one with ``ckpt_path=...`` after lowering the learning rate
    (``model.optimizer.lr=...``) or enabling gradient clipping."""
    if torch.isfinite(loss).all():
        return
    terms = ", ".join(f"{k}={float(v):.4g}" for k, v in (parts or {}).items())
    raise NonFiniteLossError(
        f"non-finite loss ({float(loss.detach()):.4g}) at global step {module.global_step}"
        + (f" [{terms}]" if terms else "")
        + ". Earlier checkpoints are untouched: resume from the last good one with ckpt_path=<run>/checkpoints/"
        "last.ckpt after lowering model.optimizer.lr, enabling gradient clipping, or trying fp32 precision."
    )
