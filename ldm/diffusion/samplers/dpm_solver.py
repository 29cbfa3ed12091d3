"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", Alg. 2)."""

from __future__ import annotations

import math

from ldm.diffusion.samplers.base import DEFAULT_TIMESTEP_SPACING, Sampler, sqrt


def half_log_snr(abar: float) -> float:
    """lambda = log(alpha / sigma) with alpha = sqrt(abar), sigma = sqrt(1 - abar); -inf at abar = 0."""
    return -math.inf if abar <= 0 else 0.5 * (math.log(abar) - math.log1p(-abar))


class DPMSolverPP2MSampler(Sampler):
    """Multistep second-order solver of the probability-flow ODE in data-prediction form:

    x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D,  h = lambda_next - lambda,
    D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1},  r = h_prev / h.

    The first step (no history) and the final jump to clean data (h = inf) are first order,
    the latter returning the last x0 prediction. Deterministic given x_T.
    """

    name = "dpmpp_2m"

    def __init__(
        self,
        steps: int = 20,
        timestep_spacing: str = DEFAULT_TIMESTEP_SPACING,
        clip_x0: bool = False,
    ):
        super().__init__(steps, timestep_spacing, clip_x0)

    def _sample(self, predict, noise, x, steps):
        prev_x0, prev_h = None, None
        for t, abar_t, abar_next in steps:
            x0, _ = predict(x, t)
            if abar_next >= 1.0:
                return x0
            h = half_log_snr(abar_next) - half_log_snr(abar_t)
            if prev_x0 is None or not math.isfinite(prev_h):
                denoised = x0
            else:
                half_inv_r = h / (2 * prev_h)
                denoised = (1 + half_inv_r) * x0 - half_inv_r * prev_x0
            sigma_ratio = sqrt(1 - abar_next) / sqrt(1 - abar_t)
            x = sigma_ratio * x - sqrt(abar_next) * math.expm1(-h) * denoised
            prev_x0, prev_h = x0, h
        return x
