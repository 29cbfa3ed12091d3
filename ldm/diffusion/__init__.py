"""Diffusion math without parameters: schedules, parameterisations, losses, guidance, samplers."""

from ldm.diffusion.discretization import (
    OUR_CONVENTION,
    SD_CONVENTION,
    TimestepConvention,
    karras_sigmas,
    sigma_grid,
)
from ldm.diffusion.guidance import Denoiser, classifier_free_guidance
from ldm.diffusion.losses import diffusion_loss, min_snr_weight, sample_noise
from ldm.diffusion.samplers import (
    DEFAULT_TIMESTEP_SPACING,
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    Sampler,
    SigmaSampler,
    build_sampler,
    make_timesteps,
)
from ldm.diffusion.schedules import (
    PARAMETERIZATIONS,
    DiffusionSchedule,
    make_beta_schedule,
    posterior_coefficients,
    rescale_zero_terminal_snr,
)

__all__ = [
    "DEFAULT_TIMESTEP_SPACING",
    "OUR_CONVENTION",
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "SD_CONVENTION",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "Denoiser",
    "DiffusionSchedule",
    "Sampler",
    "SigmaSampler",
    "TimestepConvention",
    "build_sampler",
    "classifier_free_guidance",
    "diffusion_loss",
    "karras_sigmas",
    "make_beta_schedule",
    "make_timesteps",
    "min_snr_weight",
    "posterior_coefficients",
    "rescale_zero_terminal_snr",
    "sample_noise",
    "sigma_grid",
]
