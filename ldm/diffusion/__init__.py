"""Diffusion math without parameters: schedules, parameterisations, losses, guidance, samplers."""

from ldm.diffusion.discretization import (
    OUR_CONVENTION,
    SD_CONVENTION,
    TimestepConvention,
    karras_sigmas,
    sigma_grid,
)
from ldm.diffusion.guidance import Condition, Denoiser, call_model, classifier_free_guidance
from ldm.diffusion.loss_weighting import LossWeighting, MinSNRWeighting, PlainWeighting
from ldm.diffusion.losses import DiffusionLoss, build_loss, sample_noise
from ldm.diffusion.parameterization import (
    EPS,
    PARAMETERIZATIONS,
    X0,
    Parameterization,
    V,
    as_parameterization,
)
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
    DiffusionSchedule,
    make_beta_schedule,
    posterior_coefficients,
    rescale_zero_terminal_snr,
)

__all__ = [
    "DEFAULT_TIMESTEP_SPACING",
    "EPS",
    "OUR_CONVENTION",
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "SD_CONVENTION",
    "X0",
    "Condition",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "Denoiser",
    "DiffusionLoss",
    "DiffusionSchedule",
    "LossWeighting",
    "MinSNRWeighting",
    "Parameterization",
    "PlainWeighting",
    "Sampler",
    "SigmaSampler",
    "TimestepConvention",
    "V",
    "as_parameterization",
    "build_loss",
    "build_sampler",
    "call_model",
    "classifier_free_guidance",
    "karras_sigmas",
    "make_beta_schedule",
    "make_timesteps",
    "posterior_coefficients",
    "rescale_zero_terminal_snr",
    "sample_noise",
    "sigma_grid",
]
