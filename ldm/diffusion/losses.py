"""Training noise and the weighted denoising loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ldm.diffusion.schedules import DiffusionSchedule, check_parameterization


def randn(
    shape: tuple[int, ...],
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``.

    Drawing where the generator lives makes a seeded run give the same numbers on any device. A sequence of
    generators (one per item of ``shape[0]``) draws each item from its own, so an item's noise does not depend
    on which batch it is in, or where.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([randn(tuple(shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def sample_noise(x0: Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None,
                 draw=None) -> Tensor:
    """eps ~ N(0, I) like ``x0``; with ``offset_noise > 0`` adds ``offset * N(0, 1)`` of shape
    ``[B, C, 1, 1]`` (one shift per sample and channel, broadcast over space), which lets the
    model change the mean brightness of an image (Guttenberg 2023, "Diffusion with Offset Noise").
    ``draw(shape) -> Tensor`` replaces the default draw (e.g. rank-consistent draws under DDP).
    """
    draw = draw or (lambda shape: randn(shape, generator, x0.device, x0.dtype))
    noise = draw(tuple(x0.shape))
    if offset_noise:
        offset_shape = tuple(x0.shape[:2]) + (1,) * (x0.ndim - 2)
        noise = noise + offset_noise * draw(offset_shape)
    return noise


def min_snr_weight(snr: Tensor, gamma: float, parameterization: str) -> Tensor:
    """Min-SNR-gamma loss weights ``[B]`` (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting"), expressed for the loss in each parameterisation:
    eps: min(snr, g) / snr, v: min(snr, g) / (snr + 1), x0: min(snr, g).
    """
    check_parameterization(parameterization)
    clipped = torch.clamp(snr, max=gamma)
    if parameterization == "eps":
        # == min(snr, g) / snr, written so that snr = 0 gives 1 instead of 0/0
        return torch.clamp(gamma / snr, max=1.0)
    if parameterization == "v":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    model_output: Tensor,
    target: Tensor,
    t: Tensor,
    schedule: DiffusionSchedule,
    parameterization: str = "eps",
    min_snr_gamma: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Per-sample MSE (mean over all non-batch dims, computed in float32), optionally weighted
    by Min-SNR-gamma. ``reduction="mean"`` gives a scalar, ``"none"`` the weighted ``[B]``."""
    check_parameterization(parameterization)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if model_output.shape != target.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and target {tuple(target.shape)} differ")
    err = (model_output.float() - target.float()) ** 2
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    if min_snr_gamma is not None:
        weights = min_snr_weight(schedule.snr(t).to(per_sample.device), min_snr_gamma, parameterization)
        per_sample = per_sample * weights
    return per_sample.mean() if reduction == "mean" else per_sample


def prior_preservation_loss(per_sample: Tensor, is_prior: Tensor, prior_weight: float) -> Tensor:
    """DreamBooth's objective (Ruiz et al. 2022, eq. 2): mean loss over instance items plus
    ``prior_weight`` x mean loss over class (prior-preservation) items; ``is_prior`` is a bool ``[B]``.
    A batch without one of the two kinds contributes only the other term."""
    is_prior = is_prior.to(device=per_sample.device, dtype=torch.bool).reshape(-1)
    if is_prior.shape[0] != per_sample.shape[0]:
        raise ValueError(f"is_prior has {is_prior.shape[0]} flags for {per_sample.shape[0]} losses")
    zero = per_sample.sum() * 0.0
    instance = per_sample[~is_prior].mean() if (~is_prior).any() else zero
    prior = per_sample[is_prior].mean() if is_prior.any() else zero
    return instance + prior_weight * prior
