"""Stop training with an actionable message when a loss goes NaN or infinite."""

from __future__ import annotations

import torch


class NonFiniteLossError(FloatingPointError):
    pass


def check_finite(loss: torch.Tensor, module, parts: dict | None = None) -> None:
    """Raise :class:`NonFiniteLossError` naming the step and the loss terms. Checkpoints already written
    stay on disk: resume from the last good one with ``ckpt_path=...`` and a lower learning rate
    (``model.optimizer.lr=...``, which replaces the checkpoint's: ``ldm.models.resume_lr``) or gradient
    clipping."""
    if torch.isfinite(loss).all():
        return
    terms = ", ".join(f"{k}={float(v):.4g}" for k, v in (parts or {}).items())
    raise NonFiniteLossError(
        f"non-finite loss ({float(loss.detach()):.4g}) at global step {module.global_step}"
        + (f" [{terms}]" if terms else "")
        + ". Earlier checkpoints are untouched: resume from the last good one with "
        "ckpt_path=<run>/checkpoints/last.ckpt and a lower model.optimizer.lr (a method's own rate: "
        "model.method.lr / text_encoder_lr; the new rate replaces the checkpoint's), gradient clipping "
        "(+trainer.gradient_clip_val=1.0) or fp32 precision."
    )
