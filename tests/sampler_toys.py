"""Shared by the sampler tests (their schedule: conftest.py's ``sd_schedule`` fixture): denoisers that know
the answer (an oracle that knows x0, the exact denoiser of Gaussian data) and a non-oracle toy denoiser."""

import torch

from ldm.diffusion import X0, as_parameterization

PARAMS = ("eps", "v", "x0")


def oracle(schedule, x0, parameterization, seen=None):
    """Denoiser that knows x0: returns the exact eps / v / x0 for the x_t it is given."""

    def denoise(xt, t):
        if seen is not None:
            seen.append(t.clone())
        eps = X0.to_eps(xt, t, x0, schedule)
        return as_parameterization(parameterization).target(x0, eps, t, schedule)

    return denoise


def gaussian_denoiser(schedule, mu, std, parameterization):
    """Exact E[x0 | x_t] for data ~ N(mu, std^2), converted to the model's parameterisation."""

    def denoise(xt, t):
        abar = schedule.alphas_cumprod[t].to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))
        a = abar.sqrt()
        x0_hat = mu + a * std**2 / (abar * std**2 + 1 - abar) * (xt - a * mu)
        eps_hat = X0.to_eps(xt, t, x0_hat, schedule)
        return as_parameterization(parameterization).target(x0_hat, eps_hat, t, schedule)

    return denoise


def toy_denoiser(xt, t):
    """A non-oracle denoiser whose output depends on x_t and t."""
    return 0.5 * torch.tanh(xt) + (t.float() / 1000).view(-1, *([1] * (xt.ndim - 1)))


# data ~ N(MU, STD^2) (latent-like unit scale). x_T is placed on exact quantiles of the true marginal
# q(x_{T-1}) so that the sample moments carry no Monte-Carlo noise, only solver error.

MU, STD = 1.0, 1.0


def marginal(schedule, t):
    """(alpha_t, std of x_t) for the Gaussian data."""
    abar = schedule.alphas_cumprod[t].item()
    return abar**0.5, (abar * STD**2 + 1 - abar) ** 0.5


def quantile_z(n):
    return torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
