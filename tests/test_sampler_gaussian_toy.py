"""Samplers on Gaussian data with an exact denoiser: the ODE solvers land on the data's moments."""

import pytest
import torch

from ldm.diffusion import DDIMSampler, DDPMSampler, DPMSolverPP2MSampler, build_sampler
from tests.sampler_toys import MU, PARAMS, STD, gaussian_denoiser, marginal, quantile_z

# -- Gaussian toy with an exact denoiser -------------------------------------------------------------
# data ~ N(MU, STD^2) (latent-like unit scale). x_T is placed on exact quantiles of the true marginal
# q(x_{T-1}) so that the sample moments carry no Monte-Carlo noise, only solver error.


@pytest.mark.parametrize("steps", [10, 15, 20])
@pytest.mark.parametrize("parameterization", PARAMS)
def test_dpmpp_2m_gaussian_toy(sd_schedule, parameterization, steps):
    z = quantile_z(4000)
    a_T, m_T = marginal(sd_schedule, 999)
    x_T = a_T * MU + m_T * z
    den = gaussian_denoiser(sd_schedule, MU, STD, parameterization)
    sampler = DPMSolverPP2MSampler(steps=steps)
    out = sampler(den, sd_schedule, x_T.shape, parameterization, x_T=x_T, dtype=torch.float64)
    assert out.mean().item() == pytest.approx(MU, abs=1e-3)
    # the final jump returns E[x0 | x_{t_last}], whose std is sqrt(abar_{t_last}) * STD here:
    # -0.054 at 10 steps (t_last = 99), -0.024 at 20 steps (t_last = 49)
    assert out.std().item() == pytest.approx(STD, abs=0.06 if steps == 10 else 0.035)
    # the ODE part is nearly exact: compare with the exact flow to t_last followed by that jump
    a_l, m_l = marginal(sd_schedule, sampler.timesteps(sd_schedule)[-1])
    ideal = MU + a_l * STD**2 / m_l * z
    err_dpm = (out - ideal).abs().max().item()
    ddim = DDIMSampler(steps=steps)(
        den, sd_schedule, x_T.shape, parameterization, x_T=x_T, dtype=torch.float64
    )
    err_ddim = (ddim - ideal).abs().max().item()
    assert err_dpm < 0.025
    assert err_dpm < err_ddim / 5  # second order vs first order at the same number of steps


def test_ddpm_gaussian_toy_from_noise(sd_schedule):
    """All-T ancestral sampling from pure N(0, I) with the exact denoiser reproduces the data moments."""
    std = 0.5
    den = gaussian_denoiser(sd_schedule, MU, std, "v")
    out = DDPMSampler()(den, sd_schedule, (2000, 1), "v", generator=torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(MU, abs=0.03)
    assert out.std().item() == pytest.approx(std, abs=0.03)


@pytest.mark.parametrize(
    "name,steps", [("euler", 50), ("heun", 20), ("dpmpp_2m", 20), ("dpmpp_2m_karras", 20), ("unipc", 10)]
)
def test_deterministic_solvers_on_gaussian_toy(sd_schedule, name, steps):
    """Exact denoiser for N(MU, STD^2) data: the ODE solvers land on the data's moments (first-order Euler
    needs more steps: at 20 its std is 0.93)."""
    z = quantile_z(2000)
    a_T, m_T = marginal(sd_schedule, 999)
    x_T = a_T * MU + m_T * z
    out = build_sampler(name, steps=steps)(
        gaussian_denoiser(sd_schedule, MU, STD, "eps"),
        sd_schedule,
        z.shape,
        "eps",
        x_T=x_T,
        dtype=torch.float64,
    )
    assert out.mean().item() == pytest.approx(MU, abs=0.05)
    assert out.std().item() == pytest.approx(STD, abs=0.05)
