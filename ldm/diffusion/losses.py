"""Training noise, the denoising loss (a parameterisation and a weighting) and DreamBooth's prior term."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ldm.diffusion.loss_weighting import LossWeighting, MinSNRWeighting, PlainWeighting
from ldm.diffusion.parameterization import Parameterization, as_parameterization
from ldm.diffusion.schedules import DiffusionSchedule


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


def sample_noise(
    x0: Tensor, offset_noise: float = 0.0, generator: torch.Generator | None = None, draw=None
) -> Tensor:
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


class DiffusionLoss:
    """The denoising loss: a parameterisation (what the network predicts, ``ldm.diffusion.parameterization``)
    and a weighting over noise levels (``ldm.diffusion.loss_weighting``).

    ``loss(output, x0, noise, t, schedule)``: the per-sample MSE between the output and the parameterisation's
    target (mean over all non-batch dims, computed in float32) times the weighting's ``[B]`` weights; a scalar
    with ``reduction="mean"``, the weighted ``[B]`` with ``"none"``.
    """

    def __init__(
        self, parameterization: str | Parameterization = "eps", weighting: LossWeighting | None = None
    ):
        self.parameterization = as_parameterization(parameterization)
        self.weighting = weighting if weighting is not None else PlainWeighting()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.parameterization!r}, {self.weighting!r})"

    def __call__(
        self,
        output: Tensor,
        x0: Tensor,
        noise: Tensor,
        t: Tensor,
        schedule: DiffusionSchedule,
        reduction: str = "mean",
        element_weight: Tensor | None = None,
    ) -> Tensor:
        """``element_weight``: a per-element weight broadcastable to the output (e.g. a mask ``[B, 1, h, w]``
        on the latent grid, kohya's masked loss): the per-sample loss is then ``mean(weight x err)``."""
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        target = self.parameterization.target(x0, noise, t, schedule)
        if output.shape != target.shape:
            raise ValueError(f"model output {tuple(output.shape)} and target {tuple(target.shape)} differ")
        err = (output.float() - target.float()) ** 2
        if element_weight is not None:
            err = err * element_weight.to(err.device, err.dtype)
        per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
        per_sample = per_sample * self.weighting(schedule.snr(t).to(per_sample.device), self.parameterization)
        return per_sample.mean() if reduction == "mean" else per_sample


def build_loss(
    parameterization: str | Parameterization = "eps", min_snr_gamma: float | None = None
) -> DiffusionLoss:
    """The loss that ``model.parameterization`` and ``model.min_snr_gamma`` (or ``model/loss=...``) name:
    ``min_snr_gamma=None`` is the plain MSE, a number Min-SNR-gamma. The one place those keys become
    objects."""
    weighting = PlainWeighting() if min_snr_gamma is None else MinSNRWeighting(min_snr_gamma)
    return DiffusionLoss(parameterization, weighting)


def prior_preservation_loss(
    per_sample: Tensor, is_regularization: Tensor, prior_loss_weight: float
) -> Tensor:
    """DreamBooth's objective (Ruiz et al. 2022, eq. 2): mean loss over instance items plus
    ``prior_loss_weight`` x mean loss over class (prior-preservation) items; ``is_regularization`` is a bool
    ``[B]`` (the batch key of that name). A batch without one of the two kinds contributes only the other
    term."""
    is_regularization = is_regularization.to(device=per_sample.device, dtype=torch.bool).reshape(-1)
    if is_regularization.shape[0] != per_sample.shape[0]:
        raise ValueError(
            f"is_regularization has {is_regularization.shape[0]} flags for {per_sample.shape[0]} losses"
        )
    zero = per_sample.sum() * 0.0
    instance = per_sample[~is_regularization].mean() if (~is_regularization).any() else zero
    prior = per_sample[is_regularization].mean() if is_regularization.any() else zero
    return instance + prior_loss_weight * prior


def weight_on_latent_grid(weight: Tensor | None, z0: Tensor) -> Tensor | None:
    """A per-pixel loss weight ``[B, 1, H, W]`` (or ``[B, H, W]``; e.g. a masked loss's mask at image size)
    -> ``[B, 1, h, w]`` on ``z0``'s grid (area average of each latent pixel's image pixels); None stays
    None."""
    if weight is None:
        return None
    weight = weight.to(z0.device, torch.float32)
    weight = weight.unsqueeze(1) if weight.dim() == 3 else weight
    if weight.shape[0] != z0.shape[0] or weight.shape[1] != 1:
        raise ValueError(f"loss_weight {tuple(weight.shape)} does not fit latents {tuple(z0.shape)}")
    if weight.shape[-2:] != z0.shape[-2:]:
        weight = torch.nn.functional.interpolate(weight, size=z0.shape[-2:], mode="area")
    return weight
