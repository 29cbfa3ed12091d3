"""The interface every fine-tuning method implements (LoRA, textual inversion, hypernetwork, full UNet).

``FineTuneModule`` loads the base model, freezes it, then calls ``method.attach(model)``; from then on it
asks the method only for what is below. A method is chosen with ``model/method=<name>`` (Hydra), so a
data recipe (DreamBooth's instance + class images) and a parameter recipe (LoRA, full UNet) compose.

Lifecycle: ``attach`` once (after the base is loaded, before the optimiser and before a resume), then
``parameters``/``param_groups`` for the optimiser, ``loss`` every step, ``state_dict``/``load_state_dict``
for checkpoints (exactly what a checkpoint holds and resumes from), ``export`` for the file users share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ldm.diffusion.losses import prior_preservation_loss

if TYPE_CHECKING:  # the module that hosts a method: it has .unet, .vae, .text_encoder (the frozen base)
    from ldm.models.latent_diffusion import LatentDiffusion


class MethodDisabledUnsupported(NotImplementedError):
    """Raised by ``disabled()`` for a method that cannot switch itself off (e.g. a full UNet fine-tune)."""


class FineTuneMethod:
    """Base class. Subclasses implement ``attach``, ``parameters``, ``state_dict``, ``load_state_dict`` and
    ``export``; ``disabled`` and ``loss`` have defaults."""

    export_suffix: str = ".safetensors"
    trains_text_encoder: bool = False  # True turns the text encoder's prompt cache off while training

    def __init__(self):
        self.model: LatentDiffusion | None = None

    # -- building --------------------------------------------------------------------------------------
    def attach(self, model: LatentDiffusion) -> None:
        """Add this method's parameters to ``model`` (its ``unet``/``text_encoder``, already frozen)."""
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the optimiser updates."""
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups (override to give a part its own learning rate)."""
        return [{"params": self.parameters()}]

    def train_modules(self) -> list[nn.Module]:
        """Modules put in train mode while training (dropout inside the method); the base stays in eval."""
        return []

    def before_step(self, step: int, total_steps: int | None) -> None:
        """Called before each training step with the global step and the run's total (None: unknown); a
        method whose parameters change role during the run (pivotal tuning stops its token) acts here."""

    # -- what checkpoints hold -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        raise NotImplementedError

    # -- behaviour -------------------------------------------------------------------------------------
    def disabled(self) -> contextlib.AbstractContextManager:
        """A context in which the model runs as the base did (before/after grids)."""
        raise MethodDisabledUnsupported(f"{type(self).__name__} cannot be switched off")

    def loss(
        self, per_sample_loss: Tensor, batch: Mapping[str, Any], prior_loss_weight: float | None = None
    ) -> Tensor:
        """per-sample diffusion loss [B] -> the scalar to minimise. ``prior_loss_weight`` (the core's
        ``model.prior_loss_weight``): weight of the loss on regularisation / class items (batch key
        ``is_regularization``) relative to the other items, ``mean(instance) + w * mean(class)`` (DreamBooth's
        prior preservation, Ruiz et al. 2022, eq. 2); ``None`` = one plain mean over every item of the
        batch."""
        flags = batch.get("is_regularization") if isinstance(batch, Mapping) else None
        if prior_loss_weight is None or flags is None:
            return per_sample_loss.mean()
        return prior_preservation_loss(
            per_sample_loss, torch.as_tensor(flags, device=per_sample_loss.device), prior_loss_weight
        )

    def export(self, path: str | Path, metadata: Mapping[str, Any]) -> Path:
        """Write the file users exchange (kohya LoRA, A1111 embedding...); returns its path."""
        raise NotImplementedError


def check_state_keys(expected: set[str], given: Mapping[str, Any], what: str) -> None:
    """Strict key check for ``load_state_dict``: names the missing and unexpected keys."""
    missing, unexpected = sorted(expected - set(given)), sorted(set(given) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{what}: the state does not match this method's configuration; missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}. Resume with the same model.method settings."
        )


@contextlib.contextmanager
def scaled(setter, on: float, off: float = 0.0) -> Iterator[None]:
    """Run with ``setter(off)``, then restore ``setter(on)`` (multiplier-style ``disabled()``)."""
    setter(off)
    try:
        yield
    finally:
        setter(on)
