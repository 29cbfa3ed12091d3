"""What the network predicts: eps, v or x0, as objects the loss and every sampler ask for the algebra.

With ``x_t = a x0 + s eps`` (``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)``, from
``DiffusionSchedule.coefficients``), eps-prediction regresses the noise (Ho et al. 2020), x0-prediction the
clean data, and v-prediction ``v = a eps - s x0`` (Salimans & Ho 2022, "Progressive Distillation", sec. 4).
A ``Parameterization`` gives the regression target, the conversions of a model output back to x0 and eps
(the VP samplers) and to the denoised data at a k-diffusion noise level sigma (the sigma samplers), and how
its MSE compares with the MSE in x0 (which the loss weightings of ``ldm.diffusion.loss_weighting`` are
written against).

The three objects are shared singletons looked up by name (``as_parameterization``): the name is what hparams,
checkpoints and file metadata store. This is the only module that tells them apart by name.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # no import at run time: schedules.py needs nothing from here
    from ldm.diffusion.schedules import DiffusionSchedule


class Parameterization:
    """Base class; the subclasses below are the three the project knows."""

    name: str = ""
    """``eps`` | ``v`` | ``x0``: the value of ``model.parameterization``, hparams, checkpoints,
    ``ldm.config``."""
    modelspec_name: str = ""
    """``modelspec.prediction_type`` of an exported single file."""
    finite_at_zero_snr: bool = True
    """Whether x0 can be recovered where ``abar_t = 0`` (eps cannot: x0 = (x_t - eps) / 0)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __reduce__(self):  # pickles (and deep-copies) as the shared object of its name
        return as_parameterization, (self.name,)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, schedule: DiffusionSchedule) -> Tensor:
        """The regression target for clean ``x0`` noised with ``noise`` at timesteps ``t``."""
        raise NotImplementedError

    def to_x0(self, xt: Tensor, t: Tensor, output: Tensor, schedule: DiffusionSchedule) -> Tensor:
        """x0 from a model output at ``x_t``."""
        raise NotImplementedError

    def to_eps(self, xt: Tensor, t: Tensor, output: Tensor, schedule: DiffusionSchedule) -> Tensor:
        """eps from a model output at ``x_t``."""
        raise NotImplementedError

    def denoised(self, x: Tensor, sigma: float, output: Tensor) -> Tensor:
        """x0 from a model output in k-diffusion's variance-exploding scaling ``x = x_t / alpha``,
        ``alpha = 1 / sqrt(1 + sigma^2)`` (the model was given ``alpha x``)."""
        raise NotImplementedError

    def x0_loss_scale(self, snr: Tensor) -> Tensor:
        """``[B]`` factor by which this parameterisation's MSE exceeds the MSE of the implied x0 at
        ``snr``."""
        raise NotImplementedError


class EpsPrediction(Parameterization):
    """The network predicts the noise; MSE(eps) = snr x MSE(x0)."""

    name, modelspec_name, finite_at_zero_snr = "eps", "epsilon", False

    def target(self, x0, noise, t, schedule):
        return noise

    def to_x0(self, xt, t, output, schedule):
        a, s = schedule.coefficients(t, xt)
        return (xt - s * output) / a

    def to_eps(self, xt, t, output, schedule):
        return output

    def denoised(self, x, sigma, output):
        return x - sigma * output

    def x0_loss_scale(self, snr):
        return snr


class VPrediction(Parameterization):
    """The network predicts v = a eps - s x0; MSE(v) = (snr + 1) x MSE(x0)."""

    name, modelspec_name = "v", "v"

    def target(self, x0, noise, t, schedule):
        a, s = schedule.coefficients(t, x0)
        return a * noise - s * x0

    def to_x0(self, xt, t, output, schedule):
        a, s = schedule.coefficients(t, xt)
        return a * xt - s * output

    def to_eps(self, xt, t, output, schedule):
        a, s = schedule.coefficients(t, xt)
        return s * xt + a * output

    def denoised(self, x, sigma, output):
        alpha = 1 / math.sqrt(1 + sigma**2)
        return alpha**2 * x - sigma * alpha * output

    def x0_loss_scale(self, snr):
        return snr + 1


class X0Prediction(Parameterization):
    """The network predicts the clean data; its MSE is the x0 MSE."""

    name, modelspec_name = "x0", "x0"

    def target(self, x0, noise, t, schedule):
        return x0

    def to_x0(self, xt, t, output, schedule):
        return output

    def to_eps(self, xt, t, output, schedule):
        a, s = schedule.coefficients(t, xt)
        return (xt - a * output) / s

    def denoised(self, x, sigma, output):
        return output

    def x0_loss_scale(self, snr):
        return torch.ones_like(snr)


EPS, V, X0 = EpsPrediction(), VPrediction(), X0Prediction()
_BY_NAME: dict[str, Parameterization] = {p.name: p for p in (EPS, V, X0)}
PARAMETERIZATIONS: tuple[str, ...] = tuple(_BY_NAME)


def as_parameterization(value: str | Parameterization) -> Parameterization:
    """The ``Parameterization`` named ``value`` (``eps`` | ``v`` | ``x0``); an object is returned as it is."""
    if isinstance(value, Parameterization):
        return value
    if value not in _BY_NAME:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {value!r}")
    return _BY_NAME[value]


__all__ = [
    "EPS",
    "PARAMETERIZATIONS",
    "X0",
    "EpsPrediction",
    "Parameterization",
    "V",
    "VPrediction",
    "X0Prediction",
    "as_parameterization",
]
