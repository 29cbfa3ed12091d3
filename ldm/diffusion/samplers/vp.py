"""Samplers that step between the schedule's own timesteps in the VP parameterisation (DDPM, DDIM)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ldm.diffusion.parameterization import X0
from ldm.diffusion.samplers.base import Sampler, img2img_start, sqrt, timestep_batch, track


class VPSampler(Sampler):
    """Runs ``_sample(predict, noise, x, steps, callback)`` over ``(t, abar_t, abar_prev)`` triples.

    ``abar_prev`` of the last step is ``final_abar``: 1 (clean data), or ``abar_0`` when the convention
    says ``set_alpha_to_one=False`` and the sampler honours it (DDIM).
    """

    honours_set_alpha_to_one = False
    default_spacing = "leading"  # DDPMScheduler's and DDIMScheduler's default; CompVis' "uniform"

    def final_abar(self, schedule) -> float:
        if self.honours_set_alpha_to_one and not self.convention(schedule).set_alpha_to_one:
            return float(schedule.alphas_cumprod[0])
        return 1.0

    def _run(self, denoiser, schedule, parameterization, x, noise, progress, callback, init, strength):
        timesteps = self.timesteps(schedule)
        abar = [float(a) for a in schedule.alphas_cumprod[timesteps]]
        steps = list(zip(timesteps, abar, abar[1:] + [self.final_abar(schedule)]))
        if init is not None:
            steps = steps[img2img_start(len(steps), strength) :]
            if not steps:
                return init
            x = sqrt(steps[0][1]) * init + sqrt(1 - steps[0][1]) * x
        if not parameterization.finite_at_zero_snr and steps[0][1] <= 0.0:
            raise ValueError(
                "eps-prediction cannot start at a timestep with zero SNR (x0 = (x_t - eps) / 0); "
                "use v-prediction with a zero-terminal-SNR schedule (Lin et al. 2023)"
            )

        def predict(x, t):
            t_batch = timestep_batch(t, x.shape[0], x.device)
            out = denoiser(x, t_batch)
            x0 = parameterization.to_x0(x, t_batch, out, schedule)
            if self.clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
                return x0, X0.to_eps(x, t_batch, x0, schedule)
            return x0, parameterization.to_eps(x, t_batch, out, schedule)

        return self._sample(
            predict, noise, x, track(steps, self.name, progress), callback or (lambda _: None)
        )

    def _sample(self, predict, noise, x: torch.Tensor, steps: Iterator[tuple[int, float, float]], callback):
        raise NotImplementedError


__all__ = ["VPSampler"]
