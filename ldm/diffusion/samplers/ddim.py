"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12)."""

from __future__ import annotations

from ldm.diffusion.samplers.base import sqrt
from ldm.diffusion.samplers.vp import VPSampler


class DDIMSampler(VPSampler):
    """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev).
    ``eta=0`` is deterministic (draws no noise after x_T); ``eta=1`` matches DDPM's variance. The last step
    goes to abar = 1, or to abar_0 under ``set_alpha_to_one=False`` (CompVis, SD v1 configs).
    """

    name = "ddim"
    honours_set_alpha_to_one = True

    def __init__(
        self,
        steps: int = 50,
        eta: float = 0.0,
        timestep_spacing: str | None = None,
        steps_offset: int | None = None,
        set_alpha_to_one: bool | None = None,
        clip_x0: bool = False,
    ):
        super().__init__(steps, timestep_spacing, steps_offset, set_alpha_to_one, clip_x0)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)

    def _sample(self, predict, noise, x, steps, callback):
        for i, (t, abar_t, abar_prev) in enumerate(steps):
            x0, eps = predict(x, t)
            sigma = self.eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))
            x = sqrt(abar_prev) * x0 + sqrt(1 - abar_prev - sigma**2) * eps
            if sigma > 0:
                x = x + sigma * noise()
            callback({"i": i, "x": x, "t": t, "denoised": x0})
        return x
