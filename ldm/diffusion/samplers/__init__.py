"""Samplers over a ``Denoiser`` (x_t, t) -> model output; each cites its paper."""

from __future__ import annotations

from ldm.diffusion.samplers.base import (
    DEFAULT_TIMESTEP_SPACING,
    TIMESTEP_SPACINGS,
    Sampler,
    make_timesteps,
)
from ldm.diffusion.samplers.ddim import DDIMSampler
from ldm.diffusion.samplers.ddpm import DDPMSampler
from ldm.diffusion.samplers.dpm_solver import DPMSolverPP2MSampler

SAMPLERS: dict[str, type[Sampler]] = {
    "ddpm": DDPMSampler,
    "ddim": DDIMSampler,
    "dpmpp_2m": DPMSolverPP2MSampler,
}


def build_sampler(name: str, **kwargs) -> Sampler:
    """Sampler by name: ``"ddpm"`` | ``"ddim"`` | ``"dpmpp_2m"``; kwargs go to its constructor."""
    key = name.lower()
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    return SAMPLERS[key](**kwargs)


__all__ = [
    "DEFAULT_TIMESTEP_SPACING",
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "Sampler",
    "build_sampler",
    "make_timesteps",
]
