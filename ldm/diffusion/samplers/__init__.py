"""Samplers over a ``Denoiser`` (x_t, t) -> model output; each cites its paper.

Names are the ones users know (AUTOMATIC1111 / ComfyUI): ``ddpm``, ``ddim``, ``euler``, ``euler_a``,
``heun``, ``dpmpp_2m``, ``dpmpp_2s_a``, ``unipc``; any sigma solver with ``_karras`` appended uses Karras
sigmas (``dpmpp_2m_karras``, ``euler_a_karras``, ...).
"""

from __future__ import annotations

from ldm.diffusion.discretization import TIMESTEP_SPACINGS, make_timesteps
from ldm.diffusion.samplers.base import DEFAULT_TIMESTEP_SPACING, Sampler
from ldm.diffusion.samplers.ddim import DDIMSampler
from ldm.diffusion.samplers.ddpm import DDPMSampler
from ldm.diffusion.samplers.sigma_sampler import KARRAS_CONVENTIONS, DPMSolverPP2MSampler, SigmaSampler
from ldm.diffusion.samplers.sigma_solvers import ANCESTRAL, SOLVERS

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", *SOLVERS, *(f"{name}_karras" for name in SOLVERS))

DISPLAY_NAMES: dict[str, tuple[str, str]] = {
    # ours: (AUTOMATIC1111 / ComfyUI-style name, diffusers scheduler [config])
    "ddpm": ("DDPM", "DDPMScheduler"),
    "ddim": ("DDIM", "DDIMScheduler"),
    "euler": ("Euler", "EulerDiscreteScheduler"),
    "euler_a": ("Euler a", "EulerAncestralDiscreteScheduler"),
    "heun": ("Heun", "HeunDiscreteScheduler"),
    "dpmpp_2m": ("DPM++ 2M", "DPMSolverMultistepScheduler"),
    "dpmpp_2s_a": ("DPM++ 2S a", "DPMSolverSinglestepScheduler (no ancestral variant)"),
    "unipc": ("UniPC", "UniPCMultistepScheduler"),
}


def display_name(name: str) -> str:
    """AUTOMATIC1111's name for sampler ``name`` (``dpmpp_2m_karras`` -> ``"DPM++ 2M Karras"``)."""
    base = name.removesuffix("_karras")
    label = DISPLAY_NAMES[base][0] if base in DISPLAY_NAMES else base
    return f"{label} Karras" if name.endswith("_karras") else label


def build_sampler(name: str, steps: int | None = None, eta: float | None = None, **kwargs) -> Sampler:
    """Sampler by name (see ``SAMPLERS``). ``eta``: DDIM's eta (default 0) or the ancestral solvers' noise
    (default 1); ignored by the deterministic ones. ``kwargs`` (``timestep_spacing``, ``steps_offset``,
    ``set_alpha_to_one`` for DDIM, ``karras_convention`` for ``*_karras``, ``clip_x0``) go to the
    constructor."""
    key = name.lower()
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {list(SAMPLERS)}")
    if kwargs.get("karras_convention") is None:
        kwargs.pop("karras_convention", None)
    elif not key.endswith("_karras"):
        raise ValueError(f"karras_convention applies to the *_karras samplers, not to {name}")
    if steps is not None:
        kwargs["steps"] = steps
    if key == "ddim":
        return DDIMSampler(eta=0.0 if eta is None else eta, **kwargs)
    if "set_alpha_to_one" in kwargs and kwargs["set_alpha_to_one"] is not None:
        raise ValueError(f"set_alpha_to_one applies to DDIM's last step only, not to {name}")
    kwargs.pop("set_alpha_to_one", None)
    if key == "ddpm":
        return DDPMSampler(**kwargs)
    solver = key.removesuffix("_karras")
    if solver in ANCESTRAL and eta is not None:
        kwargs["eta"] = eta
    return SigmaSampler(solver, karras=key.endswith("_karras"), **kwargs)


__all__ = [
    "DEFAULT_TIMESTEP_SPACING",
    "DISPLAY_NAMES",
    "KARRAS_CONVENTIONS",
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPP2MSampler",
    "Sampler",
    "SigmaSampler",
    "build_sampler",
    "display_name",
    "make_timesteps",
]
