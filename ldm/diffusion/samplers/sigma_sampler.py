"""A ``Sampler`` that runs one of the sigma solvers over a ``sigma_grid`` of the schedule."""

from __future__ import annotations

import functools
import math

from ldm.diffusion.discretization import sigma_grid
from ldm.diffusion.samplers.base import Sampler, img2img_start, timestep_batch
from ldm.diffusion.samplers.sigma_solvers import ANCESTRAL, MULTISTEP_FAMILY, SOLVERS

KARRAS_CONVENTIONS = ("a1111", "diffusers")
"""Where ``_karras`` sigmas span: AUTOMATIC1111's / k-diffusion's range, or diffusers' for the solver."""


class SigmaSampler(Sampler):
    """``solver`` (``euler``, ``euler_a``, ``heun``, ``dpmpp_2m``, ``dpmpp_2s_a``, ``unipc``) over ``steps``
    noise levels.

    ``karras``: Karras et al. 2022 (eq. 5, rho 7) sigmas instead of the spaced timesteps', over the range
    ``karras_convention`` names: ``"a1111"`` the model's whole sigma range (k-diffusion's
    ``get_sigmas_karras`` as AUTOMATIC1111 calls it), ``"diffusers"`` the range diffusers' scheduler of this
    solver takes with ``use_karras_sigmas=True`` (Euler, Euler a, Heun: the spaced steps' sigmas; DPM-Solver++
    and UniPC: the whole range, as A1111). ``eta``: ancestral noise of ``euler_a``/``dpmpp_2s_a``. The
    discretisation follows diffusers' scheduler of the same solver, so the same latents give the same
    image: DPM-Solver++ spaces ``steps + 1`` points and evaluates whole timesteps; Euler/Heun interpolate
    sigma at fractional (linspace) timesteps.
    x_T is scaled to ``sqrt(1 + sigma_max^2)`` (the VP marginal), except for Euler-family solvers with
    linspace/trailing spacing, which take k-diffusion's ``sigma_max`` (as diffusers does).
    """

    def __init__(
        self,
        solver: str = "euler",
        steps: int = 20,
        karras: bool = False,
        eta: float = 1.0,
        timestep_spacing: str | None = None,
        steps_offset: int | None = None,
        clip_x0: bool = False,
        rho: float = 7.0,
        karras_convention: str = "a1111",
    ):
        super().__init__(steps, timestep_spacing, steps_offset, None, clip_x0)
        if solver not in SOLVERS:
            raise ValueError(f"unknown sigma solver {solver!r}; expected one of {sorted(SOLVERS)}")
        if karras_convention not in KARRAS_CONVENTIONS:
            raise ValueError(
                f"karras_convention must be one of {KARRAS_CONVENTIONS}, got {karras_convention!r}"
            )
        self.karras_convention = karras_convention
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.solver, self.karras, self.eta, self.rho = solver, bool(karras), float(eta), float(rho)
        self.name = solver + ("_karras" if karras else "")

    def grid(self, schedule):
        multistep = self.solver in MULTISTEP_FAMILY
        return sigma_grid(
            schedule.alphas_cumprod,
            self.num_steps(schedule),
            self.convention(schedule),
            karras=self.karras,
            extra_point=multistep,
            integer=multistep,
            rho=self.rho,
            karras_spaced=self.karras_convention == "diffusers" and not multistep,
        )

    def timesteps(self, schedule) -> list:
        return [int(t) if float(t).is_integer() else t for t in self.grid(schedule).timesteps]

    def initial_scale(self, sigma_max: float, spacing: str) -> float:
        if self.solver not in MULTISTEP_FAMILY and spacing in ("linspace", "trailing"):
            return sigma_max
        return math.sqrt(1 + sigma_max**2)

    def _run(self, denoiser, schedule, parameterization, x, noise, progress, callback, init, strength):
        grid = self.grid(schedule)
        sigmas = grid.sigmas
        if init is not None:
            sigmas = sigmas[img2img_start(len(sigmas) - 1, strength) :]
            if len(sigmas) < 2:
                return init
            x = init + sigmas[0] * x
        else:
            x = x * self.initial_scale(sigmas[0], self.convention(schedule).spacing)

        def model(x, sigma: float):
            # x_vp = alpha * x; alpha_vp = alpha, sigma_vp = sigma * alpha
            alpha = 1 / math.sqrt(1 + sigma**2)
            out = denoiser(x * alpha, timestep_batch(grid.timestep_of(sigma), x.shape[0], x.device))
            denoised = parameterization.denoised(x, sigma, out)
            return denoised.clamp(-1.0, 1.0) if self.clip_x0 else denoised

        solve = SOLVERS[self.solver]
        if self.solver in ANCESTRAL:
            solve = functools.partial(solve, eta=self.eta)
        return solve(model, x, sigmas, noise=noise, callback=callback, progress=progress)


class DPMSolverPP2MSampler(SigmaSampler):
    """DPM-Solver++(2M) (Lu et al. 2022); the name older configs use for ``SigmaSampler("dpmpp_2m")``."""

    def __init__(
        self,
        steps: int = 20,
        karras: bool = False,
        timestep_spacing: str | None = None,
        steps_offset: int | None = None,
        clip_x0: bool = False,
    ):
        super().__init__("dpmpp_2m", steps, karras, 1.0, timestep_spacing, steps_offset, clip_x0)


__all__ = ["KARRAS_CONVENTIONS", "DPMSolverPP2MSampler", "SigmaSampler"]
