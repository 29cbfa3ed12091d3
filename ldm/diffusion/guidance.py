"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

A condition is the cross-attention context ``[B, L, D]`` (SD 1.x / 2.x: ``model(x, t, context)``), or a dict
of the model's keyword inputs, ``{"context": [B, L, D], "y": [B, V]}`` (SDXL: ``model(x, t, context=...,
y=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["Condition", "Denoiser", "call_model", "classifier_free_guidance"]

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""(x_t [B, ...], t LongTensor [B]) -> model output in the model's parameterisation."""

Condition = Tensor | Mapping[str, Tensor]


def call_model(model: Callable, x: Tensor, t: Tensor, condition: Condition) -> Tensor:
    """``model(x, t, context)``, or ``model(x, t, **condition)`` for a dict condition."""
    if isinstance(condition, Mapping):
        return model(x, t, **condition)
    return model(x, t, condition)


def _map(fn: Callable[..., Tensor], *conditions: Condition) -> Condition:
    if isinstance(conditions[0], Mapping):
        return {k: fn(*(c[k] for c in conditions)) for k in conditions[0]}
    return fn(*conditions)


def classifier_free_guidance(
    model: Callable[..., Tensor],
    context: Condition,
    uncond_context: Condition | None,
    scale: float,
) -> Denoiser:
    """Wrap ``model(x, t, context)`` into a guided ``Denoiser``.

    ``scale == 1`` (or no ``uncond_context``): one conditional pass. Otherwise ONE batched
    forward of ``cat([uncond, cond])`` and ``uncond + scale * (cond - uncond)``, which is valid
    in any parameterisation because eps, v and x0 are affine in each other for fixed x_t.
    ``context``/``uncond_context`` are ``[B, L, D]`` (or dicts of such per model input, see the module
    docstring); an ``uncond_context`` with batch 1 is broadcast to B.
    """
    scale = float(scale)

    def conditional(x: Tensor, t: Tensor) -> Tensor:
        return call_model(model, x, t, context)

    if scale == 1.0 or uncond_context is None:
        return conditional

    def broadcast(uncond: Tensor, cond: Tensor) -> Tensor:
        if uncond.shape[0] != cond.shape[0]:
            if uncond.shape[0] != 1:
                raise ValueError(
                    f"uncond_context batch {uncond.shape[0]} must be 1 or match context {cond.shape[0]}"
                )
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        return torch.cat([uncond, cond])

    both = _map(broadcast, uncond_context, context)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        out = call_model(model, torch.cat([x, x]), torch.cat([t, t]), both)
        out_uncond, out_cond = out[:batch], out[batch:]
        return out_uncond + scale * (out_cond - out_uncond)

    return guided
