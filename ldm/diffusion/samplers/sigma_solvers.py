"""Solvers over noise levels, k-diffusion style: one function per algorithm.

Every solver takes ``model(x, sigma) -> denoised`` (x in the VE view ``x = x0 + sigma * eps``), the
starting ``x`` (already scaled to ``sigmas[0]``), the descending ``sigmas`` (last 0), ``noise()`` (a fresh
standard normal like ``x``; ancestral solvers only), ``callback(dict)`` after each step and ``progress``.
The probability-flow ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022, eq. 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor

from ldm.diffusion.samplers.base import track

SigmaModel = Callable[[Tensor, float], Tensor]


def _steps(sigmas: Sequence[float], name: str, progress: bool):
    return track(range(len(sigmas) - 1), name, progress)


def _notify(callback, i, x, sigma, denoised) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): a deterministic step to sigma_down, then fresh noise of std sigma_up, so that
    the marginal at sigma_next is right (the DDPM posterior's variance for eta = 1; Ho et al. 2020, eq. 7)."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def sample_euler(model: SigmaModel, x: Tensor, sigmas, noise=None, callback=None, progress=False) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, "Elucidating the Design Space of
    Diffusion-Based Generative Models", Alg. 2 with S_churn = 0)."""
    for i in _steps(sigmas, "euler", progress):
        denoised = model(x, sigmas[i])
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        _notify(callback, i, x, sigmas[i], denoised)
    return x


def sample_euler_ancestral(
    model: SigmaModel, x: Tensor, sigmas, noise=None, callback=None, progress=False, eta: float = 1.0
) -> Tensor:
    """Euler step to sigma_down, then ancestral noise sigma_up (Ho et al. 2020, "Denoising Diffusion
    Probabilistic Models", Alg. 2, in k-diffusion's Euler form)."""
    for i in _steps(sigmas, "euler_a", progress):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_split(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise() * sigma_up
        _notify(callback, i, x, sigmas[i], denoised)
    return x


def sample_heun(model: SigmaModel, x: Tensor, sigmas, noise=None, callback=None, progress=False) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1); the last step to sigma = 0 is Euler."""
    for i in _steps(sigmas, "heun", progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        slope = (x - denoised) / sigma
        x_euler = x + slope * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            slope_next = (x_euler - model(x_euler, sigma_next)) / sigma_next
            x = x + (slope + slope_next) / 2 * (sigma_next - sigma)
        _notify(callback, i, x, sigma, denoised)
    return x


def sample_dpmpp_2m(
    model: SigmaModel, x: Tensor, sigmas, noise=None, callback=None, progress=False
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Alg. 2): multistep, second order in log-SNR; the first and last steps first
    order."""
    previous, h_previous = None, None
    for i in _steps(sigmas, "dpmpp_2m", progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)  # lambda = -log(sigma) grows by h
            corrected = denoised
            if previous is not None:
                half_inv_r = h / (2 * h_previous)
                corrected = (1 + half_inv_r) * denoised - half_inv_r * previous
            x = (sigma_next / sigma) * x - math.expm1(-h) * corrected
            h_previous = h
        previous = denoised
        _notify(callback, i, x, sigma, denoised)
    return x


def sample_dpmpp_2s_ancestral(
    model: SigmaModel, x: Tensor, sigmas, noise=None, callback=None, progress=False, eta: float = 1.0
) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, Alg. 1, singlestep, midpoint in log-SNR) to sigma_down, then
    ancestral noise sigma_up (as Euler ancestral)."""
    for i in _steps(sigmas, "dpmpp_2s_a", progress):
        sigma = sigmas[i]
        denoised = model(x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigmas[i + 1], eta)
        if sigma_down == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_down)
            sigma_mid = math.exp(math.log(sigma) - h / 2)
            x_mid = (sigma_mid / sigma) * x - math.expm1(-h / 2) * denoised
            x = (sigma_down / sigma) * x - math.expm1(-h) * model(x_mid, sigma_mid)
        if sigmas[i + 1] > 0:
            x = x + noise() * sigma_up
        _notify(callback, i, x, sigma, denoised)
    return x


def _unipc_predict(x: Tensor, history: list, sigma_next: float, order: int) -> Tensor:
    """UniP-2 from the newest (sigma, denoised) in ``history`` to ``sigma_next`` (bh2: B(h) = e^h - 1)."""
    sigma, denoised = history[-1]
    if sigma_next == 0:
        return denoised
    h = math.log(sigma) - math.log(sigma_next)
    phi = math.expm1(-h)
    x = (sigma_next / sigma) * x - phi * denoised
    if order == 2:
        sigma_prev, denoised_prev = history[-2]
        rk = math.log(sigma / sigma_prev) / h
        x = x - phi * 0.5 * (denoised_prev - denoised) / rk
    return x


def _unipc_correct(x_last: Tensor, history: list, sigma: float, denoised_new: Tensor, order: int) -> Tensor:
    """UniC: redo the last step from ``x_last`` using the new evaluation ``denoised_new`` at ``sigma`` too."""
    sigma_last, denoised = history[-1]
    h = math.log(sigma_last) - math.log(sigma)
    phi = math.expm1(-h)
    x = (sigma / sigma_last) * x_last - phi * denoised
    if order == 1:
        return x - phi * 0.5 * (denoised_new - denoised)
    sigma_prev, denoised_prev = history[-2]
    rk = math.log(sigma_last / sigma_prev) / h
    phi_2 = phi / -h - 1  # h phi_2 / h, then the next order's coefficient (paper eq. 6-8)
    b1, b2 = phi_2 / phi, (phi_2 / -h - 0.5) * 2 / phi
    rho_prev = (b1 - b2) / (1 - rk)  # solves [[1, 1], [rk, 1]] rho = b
    rho_new = b1 - rho_prev
    return x - phi * (rho_prev * (denoised_prev - denoised) / rk + rho_new * (denoised_new - denoised))


def sample_unipc(model: SigmaModel, x: Tensor, sigmas, noise=None, callback=None, progress=False) -> Tensor:
    """UniPC-2, bh2 (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
    Diffusion Models", Alg. 2-3): the multistep predictor UniP-2, then the corrector UniC, which reuses the
    next step's model evaluation (no extra cost). First and last steps first order."""
    history, x_last, order = [], None, 0
    for i in _steps(sigmas, "unipc", progress):
        denoised = model(x, sigmas[i])
        if x_last is not None:
            x = _unipc_correct(x_last, history, sigmas[i], denoised, order)
        history = [*history[-1:], (sigmas[i], denoised)]
        order = min(2, len(sigmas) - 1 - i, len(history))
        x_last = x
        x = _unipc_predict(x, history, sigmas[i + 1], order)
        _notify(callback, i, x, sigmas[i], denoised)
    return x


SOLVERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    "unipc": sample_unipc,
}
ANCESTRAL = ("euler_a", "dpmpp_2s_a")
MULTISTEP_FAMILY = ("dpmpp_2m", "dpmpp_2s_a", "unipc")
"""Solvers that take diffusers' DPM-Solver discretisation (steps + 1 grid, whole timesteps, VP noise)."""

__all__ = [
    "ANCESTRAL",
    "MULTISTEP_FAMILY",
    "SOLVERS",
    "ancestral_split",
    "sample_dpmpp_2m",
    "sample_dpmpp_2s_ancestral",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_unipc",
]
