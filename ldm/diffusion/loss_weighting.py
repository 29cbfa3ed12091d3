"""How much each noise level counts in the loss: per-sample weights from the signal-to-noise ratio.

A weighting is written once, as a weight ``w_x0(snr)`` on the x0 error, and applies to any parameterisation
by dividing by that parameterisation's ``x0_loss_scale(snr)`` (eps: snr, v: snr + 1, x0: 1): the weighted loss
is then the same objective whatever the network predicts. Plain MSE is the weighting whose weight is 1 in
every parameterisation. A new weighting (P2, Choi et al. 2022: ``w_x0 = snr / (k + snr)^gamma``; the debiased
one of Yu et al. 2024: ``w_x0 = sqrt(snr)``) is a subclass with its ``__call__``, registered in
``ldm.diffusion.losses.build_loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldm.diffusion.parameterization import Parameterization


class LossWeighting:
    """``weighting(snr, parameterization) -> [B]`` weights for per-sample losses in that parameterisation."""

    def __call__(self, snr: Tensor, parameterization: Parameterization) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class PlainWeighting(LossWeighting):
    """Every sample weighs 1: the plain MSE of the parameterisation (the CompVis / diffusers default)."""

    def __call__(self, snr, parameterization):
        return torch.ones_like(snr)


class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"):
    ``w_x0 = min(snr, gamma)``, i.e. eps: ``min(snr, g) / snr``, v: ``min(snr, g) / (snr + 1)``,
    x0: ``min(snr, g)``.
    Where the scale is 0 (eps at snr 0, zero-terminal-SNR schedules) the weight takes its limit 1."""

    def __init__(self, gamma: float = 5.0):
        if not gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
        self.gamma = float(gamma)

    def __call__(self, snr, parameterization):
        clipped = torch.clamp(snr, max=self.gamma)
        scale = parameterization.x0_loss_scale(snr)
        return torch.where(scale > 0, clipped / scale, torch.ones_like(snr))


__all__ = ["LossWeighting", "MinSNRWeighting", "PlainWeighting"]
