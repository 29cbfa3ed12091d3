"""Ancestral sampling with the DDPM posterior (Ho et al. 2020, Alg. 2; respacing as in Nichol & Dhariwal
2021)."""

from __future__ import annotations

from ldm.diffusion.samplers.base import sqrt
from ldm.diffusion.samplers.vp import VPSampler
from ldm.diffusion.schedules import posterior_coefficients


class DDPMSampler(VPSampler):
    """x_prev ~ q(x_prev | x_t, x0_hat) with the "fixed small" variance beta_tilde.

    ``steps=None`` runs all T timesteps; fewer steps use the respaced schedule
    ``beta = 1 - abar_t / abar_prev`` between consecutive kept timesteps. Always ends on clean data.
    """

    name = "ddpm"

    def __init__(
        self,
        steps: int | None = None,
        timestep_spacing: str | None = None,
        steps_offset: int | None = None,
        clip_x0: bool = False,
    ):
        super().__init__(steps, timestep_spacing, steps_offset, None, clip_x0)

    def _sample(self, predict, noise, x, steps, callback):
        for i, (t, abar_t, abar_prev) in enumerate(steps):
            x0, _ = predict(x, t)
            coef_x0, coef_xt, variance = posterior_coefficients(abar_t, abar_prev)
            x = coef_x0 * x0 + coef_xt * x
            if variance > 0:
                x = x + sqrt(variance) * noise()
            callback({"i": i, "x": x, "t": t, "denoised": x0})
        return x
