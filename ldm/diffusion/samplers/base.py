"""What every sampler shares: timestep spacing, initial noise, model-output conversion."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ldm.diffusion.guidance import Denoiser
from ldm.diffusion.losses import randn
from ldm.diffusion.schedules import DiffusionSchedule, check_parameterization

TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
DEFAULT_TIMESTEP_SPACING = "trailing"


def make_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = DEFAULT_TIMESTEP_SPACING
) -> list[int]:
    """``steps`` distinct training timesteps in ``[0, T-1]``, descending.

    ``"trailing"`` (default): ``T-1 - floor(i*T/steps)``, always starts at T-1, i.e. at the
    noisiest level, the one that pure N(0, I) noise best matches (and the only correct start
    with a zero-terminal-SNR schedule; Lin et al. 2023, sec. 3.3). ``"leading"``:
    ``floor(i*T/steps)`` reversed, includes 0 but starts below T-1 (the LDM/SD v1 default).
    ``"linspace"``: ``round(linspace(0, T-1, steps))`` reversed, includes both ends. With
    ``steps == T`` all three give ``T-1, ..., 0``.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    T = num_train_timesteps
    if spacing == "trailing":
        return [T - 1 - (i * T) // steps for i in range(steps)]
    if spacing == "leading":
        return [(i * T) // steps for i in reversed(range(steps))]
    if spacing == "linspace":
        if steps == 1:
            return [T - 1]
        return [round(i * (T - 1) / (steps - 1)) for i in reversed(range(steps))]
    raise ValueError(f"timestep spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")


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


class Sampler:
    """Base for samplers over a ``Denoiser``; subclasses implement ``_sample``.

    A run evaluates the denoiser once per timestep of ``timesteps(schedule)`` (descending,
    ``"trailing"`` spacing by default, see ``make_timesteps``) and ends at the clean data
    (``abar = 1``): the final jump returns the x0 estimate at the last timestep. Runs under
    ``torch.no_grad``. ``clip_x0`` clamps every x0 estimate to [-1, 1] (pixel-space data only;
    off by default, latents are unbounded) and re-derives eps from the clamped value.
    """

    name = "sampler"

    def __init__(
        self, steps: int | None, timestep_spacing: str = DEFAULT_TIMESTEP_SPACING, clip_x0: bool = False
    ):
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        self.steps = steps
        self.timestep_spacing = timestep_spacing
        self.clip_x0 = clip_x0

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"

    def timesteps(self, schedule: DiffusionSchedule) -> list[int]:
        steps = schedule.num_timesteps if self.steps is None else self.steps
        return make_timesteps(schedule.num_timesteps, steps, self.timestep_spacing)

    def __call__(
        self,
        denoiser: Denoiser,
        schedule: DiffusionSchedule,
        shape: tuple,
        parameterization: str = "eps",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        x_T: Tensor | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Draw samples ``[shape]`` (x0 space). All randomness comes from ``generator``;
        ``x_T`` replaces the initial noise."""
        check_parameterization(parameterization)
        timesteps = self.timesteps(schedule)
        abar = [float(a) for a in schedule.alphas_cumprod[timesteps]]
        if parameterization == "eps" and abar[0] <= 0.0:
            raise ValueError(
                "eps-prediction cannot start at a timestep with zero SNR (x0 = (x_t - eps) / 0); "
                "use v-prediction with a zero-terminal-SNR schedule (Lin et al. 2023)"
            )
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

        def predict(x: Tensor, t: int) -> tuple[Tensor, Tensor]:
            t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
            out = denoiser(x, t_batch)
            x0 = schedule.predict_x0(x, t_batch, out, parameterization)
            if self.clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
                eps = schedule.predict_eps(x, t_batch, x0, "x0")
            else:
                eps = schedule.predict_eps(x, t_batch, out, parameterization)
            return x0, eps

        def noise() -> Tensor:
            return randn(shape, generator, device, dtype)

        # each step: (t, abar_t, abar_prev), abar_prev = 1 for the final jump to clean data
        steps = list(zip(timesteps, abar, abar[1:] + [1.0]))
        with torch.no_grad():
            return self._sample(predict, noise, x, track(steps, self.name, progress))

    def _sample(self, predict, noise, x: Tensor, steps: Iterator[tuple[int, float, float]]) -> Tensor:
        raise NotImplementedError


def sqrt(value: float) -> float:
    return math.sqrt(max(value, 0.0))
