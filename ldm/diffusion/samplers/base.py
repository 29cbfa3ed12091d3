"""What every sampler shares: the timestep convention, the initial noise, img2img, the call interface."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from ldm.diffusion.discretization import (
    SAMPLER_DEFAULT,
    TIMESTEP_SPACINGS,
    TimestepConvention,
    make_timesteps,
)
from ldm.diffusion.guidance import Denoiser
from ldm.diffusion.losses import randn
from ldm.diffusion.parameterization import EPS, Parameterization, as_parameterization
from ldm.diffusion.schedules import DiffusionSchedule

DEFAULT_TIMESTEP_SPACING = "trailing"
"""The spacing of models trained here (``OUR_CONVENTION``); a schedule carries its model's own."""

StepCallback = Callable[[dict], None]
"""Called after every step with ``{"i", "x", "denoised"}`` and ``"t"`` (VP samplers) or ``"sigma"``."""


def track(iterable: Sequence, description: str, enabled: bool) -> Iterable:
    """A progress bar with rich (or tqdm) when ``enabled`` and importable, else the iterable."""
    if not enabled:
        return iterable
    try:
        from rich.progress import track as rich_track

        return rich_track(iterable, description=description, total=len(iterable), transient=True)
    except ImportError:
        pass
    try:
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=description, total=len(iterable), leave=False)
    except ImportError:
        return iterable


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first step an img2img run takes: the last ``int(steps * strength)`` steps run
    (diffusers' and AUTOMATIC1111's rule)."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    return steps - min(int(steps * strength), steps)


class Sampler:
    """Base for samplers over a ``Denoiser``; subclasses implement ``_run``.

    ``timestep_spacing`` / ``steps_offset`` / ``set_alpha_to_one``: ``None`` takes the schedule's
    ``convention`` (the model's: ours trail; SD files take each sampler's ``default_spacing``, offset 1), a
    value overrides it.
    ``clip_x0`` clamps every x0 estimate to [-1, 1] (pixel-space data only; latents are unbounded).
    A call runs under ``torch.no_grad``; all randomness comes from ``generator``: one for the batch, or a
    sequence of one per item (item ``i``'s initial and per-step noise from ``generator[i]`` alone, so an item
    comes out the same whatever batch it is sampled in).
    """

    name = "sampler"
    default_spacing = "linspace"
    """The spacing taken when the schedule's is ``SAMPLER_DEFAULT`` (diffusers' default for the scheduler)."""

    def __init__(
        self,
        steps: int | None,
        timestep_spacing: str | None = None,
        steps_offset: int | None = None,
        set_alpha_to_one: bool | None = None,
        clip_x0: bool = False,
    ):
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        self.steps = steps
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.set_alpha_to_one = set_alpha_to_one
        self.clip_x0 = clip_x0
        TimestepConvention().replace(timestep_spacing, steps_offset, set_alpha_to_one)  # validates

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def convention(self, schedule: DiffusionSchedule) -> TimestepConvention:
        """The schedule's convention with this sampler's overrides (``SAMPLER_DEFAULT``: its own spacing)."""
        convention = schedule.convention
        if convention.spacing == SAMPLER_DEFAULT:
            convention = convention.replace(spacing=self.default_spacing)
        return convention.replace(self.timestep_spacing, self.steps_offset, self.set_alpha_to_one)

    def num_steps(self, schedule: DiffusionSchedule) -> int:
        return schedule.num_timesteps if self.steps is None else self.steps

    def timesteps(self, schedule: DiffusionSchedule) -> list:
        """The timesteps the denoiser is given, in order."""
        conv = self.convention(schedule)
        return make_timesteps(
            schedule.num_timesteps, self.num_steps(schedule), conv.spacing, conv.steps_offset
        )

    def __call__(
        self,
        denoiser: Denoiser,
        schedule: DiffusionSchedule,
        shape: tuple,
        parameterization: Parameterization | str = EPS,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        x_T: Tensor | None = None,
        progress: bool = False,
        callback: StepCallback | None = None,
        init: Tensor | None = None,
        strength: float = 1.0,
    ) -> Tensor:
        """Samples ``[shape]`` (x0 space) from a denoiser whose outputs are ``parameterization``'s (an object
        of ``ldm.diffusion.parameterization``, or its name). ``x_T``: the initial standard-normal noise (drawn
        from ``generator`` when absent). ``init`` + ``strength`` (img2img, Meng et al. 2022, "SDEdit"): noise
        the clean ``init`` with that noise to the level of the last ``int(steps * strength)`` steps and run
        those."""
        parameterization = as_parameterization(parameterization)
        if device is None:
            device = x_T.device if x_T is not None else torch.device("cpu")
        device = torch.device(device)
        shape = tuple(shape)
        if x_T is None:
            x = randn(shape, generator, device, dtype)
        else:
            if tuple(x_T.shape) != shape:
                raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
            x = x_T.to(device=device, dtype=dtype)
        if init is not None:
            if tuple(init.shape) != shape:
                raise ValueError(f"init has shape {tuple(init.shape)}, expected {shape}")
            init = init.to(device=device, dtype=dtype)
            img2img_start(1, strength)  # validates strength

        def noise() -> Tensor:
            return randn(shape, generator, device, dtype)

        with torch.no_grad():
            return self._run(
                denoiser, schedule, parameterization, x, noise, progress, callback, init, strength
            )

    def _run(
        self, denoiser, schedule, parameterization, x, noise, progress, callback, init, strength
    ) -> Tensor:
        raise NotImplementedError


def sqrt(value: float) -> float:
    return math.sqrt(max(value, 0.0))


def timestep_batch(t: float, batch: int, device: torch.device) -> Tensor:
    """``t`` repeated ``[batch]``: a LongTensor for whole timesteps, float32 for fractional ones."""
    if float(t).is_integer():
        return torch.full((batch,), int(t), dtype=torch.long, device=device)
    return torch.full((batch,), float(t), dtype=torch.float32, device=device)


__all__ = [
    "DEFAULT_TIMESTEP_SPACING",
    "Sampler",
    "StepCallback",
    "img2img_start",
    "sqrt",
    "timestep_batch",
    "track",
]
