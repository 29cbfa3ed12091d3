"""Where a sampler evaluates the model: timestep conventions, and sigma grids (incl. Karras sigmas).

Two views of the same VP process: timesteps ``t`` index ``abar_t``; the noise level ``sigma_t =
sqrt((1 - abar_t) / abar_t)`` is the VE view that k-diffusion-style samplers integrate in (Karras et
al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", sec. 2 and 4).

The conventions that decide which timesteps a run of ``steps`` uses are data (``TimestepConvention``):
they differ between ecosystems, and the same weights give visibly different images under another one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
SAMPLER_DEFAULT = "sampler_default"
"""A schedule's spacing when its model names none: each sampler takes its own default (``Sampler.
default_spacing``: leading for DDPM/DDIM, linspace for the sigma solvers), as diffusers' schedulers do when
swapped in with ``from_config`` on a config without ``timestep_spacing`` and as AUTOMATIC1111 samples."""


@dataclass(frozen=True)
class TimestepConvention:
    """How ``steps`` sampling steps map to training timesteps (diffusers' ``scheduler_config.json`` keys).

    ``spacing``: ``"leading"`` ``i * (T // steps)`` (+ offset), ``"trailing"``
    ``round(T - i * T / steps) - 1`` (starts at T-1), ``"linspace"`` ``linspace(0, T-1, steps)`` (Lin et al.
    2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2), ``SAMPLER_DEFAULT``
    each sampler's own (a schedule's value only; ``Sampler.convention`` resolves it). ``steps_offset``: added
    to leading timesteps (SD v1 / CompVis: 1). ``set_alpha_to_one``: DDIM's last step goes to ``abar = 1``
    (clean data) rather than to ``abar_0`` (CompVis and SD v1 configs: ``False``).
    """

    spacing: str = "trailing"
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    def __post_init__(self):
        if self.spacing not in (*TIMESTEP_SPACINGS, SAMPLER_DEFAULT):
            expected = (*TIMESTEP_SPACINGS, SAMPLER_DEFAULT)
            raise ValueError(f"timestep_spacing must be one of {expected}, got {self.spacing!r}")
        if int(self.steps_offset) != self.steps_offset or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be a non-negative integer, got {self.steps_offset!r}")

    def as_config(self) -> dict:
        """The ``DiffusionSchedule.from_config`` keys: timestep_spacing, steps_offset, set_alpha_to_one."""
        values = asdict(self)
        return {
            "timestep_spacing": values["spacing"],
            "steps_offset": int(values["steps_offset"]),
            "set_alpha_to_one": bool(values["set_alpha_to_one"]),
        }

    def replace(self, spacing=None, steps_offset=None, set_alpha_to_one=None) -> TimestepConvention:
        """A copy with the given (non-None) fields replaced."""
        return TimestepConvention(
            self.spacing if spacing is None else spacing,
            self.steps_offset if steps_offset is None else int(steps_offset),
            self.set_alpha_to_one if set_alpha_to_one is None else bool(set_alpha_to_one),
        )


OUR_CONVENTION = TimestepConvention("trailing", 0, True)
"""Models trained here: start at the noisiest level, end on clean data."""
SD_CONVENTION = TimestepConvention(SAMPLER_DEFAULT, 1, False)
"""Stable Diffusion v1/v2 files: each sampler's own spacing, offset 1, DDIM's last step to abar_0 -- the
released ``scheduler_config.json`` (no ``timestep_spacing`` key) under any diffusers scheduler, and
AUTOMATIC1111: DDIM/DDPM lead ("uniform" + 1, CompVis'), the k-samplers space linearly."""


def spaced_timesteps(
    num_train_timesteps: int,
    steps: int,
    convention: TimestepConvention,
    extra_point: bool = False,
    integer: bool = True,
) -> list[float]:
    """``steps`` descending timesteps in ``[0, T-1]``.

    ``extra_point``: space ``steps + 1`` points and drop the lowest (diffusers' DPM-Solver family, which
    leaves the last step to go from there to clean data) -- leading and linspace only. ``integer=False``
    keeps linspace's fractional timesteps (diffusers' Euler family interpolates sigma between them).
    """
    T = num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    spacing, n = convention.spacing, steps + int(extra_point)
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"spacing {spacing!r} is a schedule's; a sampler resolves it (Sampler.convention)")
    if spacing == "trailing":
        ts = [float(round(T - i * T / steps) - 1) for i in range(steps)]
    elif spacing == "leading":
        ratio = T // n
        ts = [float(i * ratio + convention.steps_offset) for i in reversed(range(n))]
    else:
        step = (T - 1) / (n - 1) if n > 1 else 0.0  # step first, as numpy.linspace (rounding ties agree)
        ts = [i * step if n > 1 else T - 1.0 for i in reversed(range(n))]
        ts = [float(round(t)) for t in ts] if integer or extra_point else ts
    ts = ts[:steps]
    if integer:
        ts = [float(round(t)) for t in ts]
    if max(ts) > T - 1 + 1e-6:
        raise ValueError(
            f"steps_offset {convention.steps_offset} pushes timestep {max(ts):g} past T-1 = {T - 1}"
        )
    return [min(t, T - 1.0) for t in ts]


def make_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = "trailing", steps_offset: int = 0
) -> list[int]:
    """Integer timesteps of ``spaced_timesteps`` (DDPM/DDIM)."""
    convention = TimestepConvention(spacing, steps_offset)
    return [int(t) for t in spaced_timesteps(num_train_timesteps, steps, convention)]


ZERO_SNR_ABAR = 2.0**-24
"""abar_t = 0 (a zero-terminal-SNR schedule's last step) is read as this, as diffusers does (sigma ~ 4096)."""


def sigma_table(alphas_cumprod: Tensor) -> Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t), float64 ``[T]`` (abar_t clamped to ``ZERO_SNR_ABAR``)."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(min=ZERO_SNR_ABAR)
    return ((1 - abar) / abar).sqrt()


def interpolate_sigma(table: Tensor, t: float) -> float:
    """sigma at a (fractional) timestep, linear in t between table entries."""
    low = min(math.floor(t), len(table) - 1)
    high = min(low + 1, len(table) - 1)
    w = t - low
    return float(table[low] * (1 - w) + table[high] * w)


def sigma_to_timestep(table: Tensor, sigma: float) -> float:
    """The (fractional) timestep of noise level ``sigma``: linear interpolation in log sigma (the inverse
    k-diffusion and diffusers use), clamped to ``[0, T-1]``."""
    log_table = table.log()
    log_sigma = math.log(max(sigma, 1e-10))
    high = int(torch.searchsorted(log_table, torch.tensor(log_sigma, dtype=torch.float64)))
    high = min(max(high, 1), len(table) - 1)
    low = high - 1
    w = (float(log_table[low]) - log_sigma) / (float(log_table[low]) - float(log_table[high]))
    return low + min(max(w, 0.0), 1.0)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022, eq. 5: ``n`` sigmas from sigma_max to sigma_min, uniform in ``sigma^(1/rho)``."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    if n == 1:
        return [sigma_max]
    return [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)]


@dataclass(frozen=True)
class SigmaGrid:
    """A run's noise levels ``sigmas`` ``[steps + 1]`` (descending, last 0) and the timestep the model is
    given at each of the first ``steps``; ``timestep_of`` maps any other sigma (a solver's midpoint)."""

    sigmas: list[float]
    timesteps: list[float]
    table: Tensor

    def timestep_of(self, sigma: float) -> float:
        for s, t in zip(self.sigmas, self.timesteps):
            if s == sigma:
                return t
        return sigma_to_timestep(self.table, sigma)


def sigma_grid(
    alphas_cumprod: Tensor,
    steps: int,
    convention: TimestepConvention,
    karras: bool = False,
    extra_point: bool = False,
    integer: bool = True,
    rho: float = 7.0,
    karras_spaced: bool = False,
) -> SigmaGrid:
    """The sigmas of a run: sigma at the spaced timesteps (interpolated for fractional ones), or Karras
    sigmas with the model given the matching timestep (rounded when ``integer``); then a final 0.

    Karras sigmas span the whole table (k-diffusion's ``get_sigmas_karras`` over the model's sigmas, as
    AUTOMATIC1111 and diffusers' DPM-Solver/UniPC do), or with ``karras_spaced`` the range of the spaced
    steps' sigmas (diffusers' Euler and Heun with ``use_karras_sigmas=True``)."""
    table = sigma_table(alphas_cumprod)
    timesteps = spaced_timesteps(len(table), steps, convention, extra_point, integer)
    sigmas = [interpolate_sigma(table, t) for t in timesteps]
    if karras:
        low, high = (sigmas[-1], sigmas[0]) if karras_spaced else (float(table[0]), float(table[-1]))
        sigmas = karras_sigmas(low, high, steps, rho)
        timesteps = [sigma_to_timestep(table, s) for s in sigmas]
        timesteps = [float(round(t)) for t in timesteps] if integer else timesteps
    return SigmaGrid(sigmas + [0.0], timesteps, table)


__all__ = [
    "OUR_CONVENTION",
    "SAMPLER_DEFAULT",
    "SD_CONVENTION",
    "TIMESTEP_SPACINGS",
    "SigmaGrid",
    "TimestepConvention",
    "interpolate_sigma",
    "karras_sigmas",
    "make_timesteps",
    "sigma_grid",
    "sigma_table",
    "sigma_to_timestep",
]
