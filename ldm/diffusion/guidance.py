"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""(x_t [B, ...], t LongTensor [B]) -> model output in the model's parameterisation."""


def classifier_free_guidance(
    model: Callable[[Tensor, Tensor, Tensor], Tensor],
    context: Tensor,
    uncond_context: Tensor | None,
    scale: float,
) -> Denoiser:
    """Wrap ``model(x, t, context)`` into a guided ``Denoiser``.

    ``scale == 1`` (or no ``uncond_context``): one conditional pass. Otherwise ONE batched
    forward of ``cat([uncond, cond])`` and ``uncond + scale * (cond - uncond)``, which is valid
    in any parameterisation because eps, v and x0 are affine in each other for fixed x_t.
    ``context``/``uncond_context`` are ``[B, L, D]``; an ``uncond_context`` with batch 1 is
    broadcast to B.
    """
    scale = float(scale)

    def conditional(x: Tensor, t: Tensor) -> Tensor:
        return model(x, t, context)

    if scale == 1.0 or uncond_context is None:
        return conditional

    def guided(x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        cond = context
        uncond = uncond_context
        if uncond.shape[0] != cond.shape[0]:
            if uncond.shape[0] != 1:
                raise ValueError(
                    f"uncond_context batch {uncond.shape[0]} must be 1 or match context {cond.shape[0]}"
                )
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
        out_uncond, out_cond = out[:batch], out[batch:]
        return out_uncond + scale * (out_cond - out_uncond)

    return guided
