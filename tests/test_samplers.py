"""Samplers: oracle recovery, determinism/seeding, cross-checks, and a Gaussian toy with an exact denoiser."""

import itertools

import pytest
import torch

from ldm.diffusion import (
    X0,
    DDIMSampler,
    DDPMSampler,
    DiffusionSchedule,
    DPMSolverPP2MSampler,
    as_parameterization,
    build_sampler,
    make_beta_schedule,
    make_timesteps,
)

PARAMS = ("eps", "v", "x0")
SAMPLER_FACTORIES = {
    "ddpm_full": lambda: DDPMSampler(),
    "ddpm_25": lambda: DDPMSampler(steps=25),
    "ddim_50": lambda: DDIMSampler(steps=50),
    "ddim_eta1": lambda: DDIMSampler(steps=20, eta=1.0),
    "dpmpp_2m_20": lambda: DPMSolverPP2MSampler(steps=20),
    "dpmpp_2m_leading": lambda: DPMSolverPP2MSampler(steps=10, timestep_spacing="leading"),
    "euler_20": lambda: build_sampler("euler", steps=20),
    "euler_a_20": lambda: build_sampler("euler_a", steps=20),
    "heun_10": lambda: build_sampler("heun", steps=10),
    "dpmpp_2s_a_10": lambda: build_sampler("dpmpp_2s_a", steps=10),
    "unipc_10": lambda: build_sampler("unipc", steps=10),
}
TWO_EVALS_PER_STEP = ("heun_10", "dpmpp_2s_a_10")


@pytest.fixture(scope="module")
def sd_schedule():
    return DiffusionSchedule.from_config("scaled_linear", num_timesteps=1000)


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


# -- timestep spacing ---------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 50, 1000])
def test_timesteps_distinct_descending_in_range(spacing, steps):
    ts = make_timesteps(1000, steps, spacing)
    assert len(ts) == len(set(ts)) == steps
    assert all(a > b for a, b in itertools.pairwise(ts))
    assert 0 <= min(ts) and max(ts) <= 999
    if steps == 1000:
        assert ts == list(range(999, -1, -1))


def test_timestep_spacing_endpoints():
    assert make_timesteps(1000, 10, "trailing")[0] == 999
    assert make_timesteps(1000, 10, "trailing")[-1] == 99
    assert make_timesteps(1000, 10, "leading") == list(range(900, -1, -100))
    assert make_timesteps(1000, 10, "linspace")[::9] == [999, 0]
    with pytest.raises(ValueError):
        make_timesteps(1000, 1001)
    with pytest.raises(ValueError):
        make_timesteps(1000, 10, "uniform")


# -- oracle denoiser ------------------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", PARAMS)
@pytest.mark.parametrize("name", list(SAMPLER_FACTORIES))
def test_oracle_denoiser_recovers_x0(sd_schedule, name, parameterization):
    sampler = SAMPLER_FACTORIES[name]()
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    seen = []
    out = sampler(
        oracle(sd_schedule, x0, parameterization, seen),
        sd_schedule,
        x0.shape,
        parameterization=parameterization,
        generator=torch.Generator().manual_seed(1),
    )
    assert out.shape == x0.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=1e-4)
    # the denoiser sees one LongTensor [B] per step, all in [0, T-1], starting at T-1 (trailing)
    expected = sampler.timesteps(sd_schedule)
    if name in TWO_EVALS_PER_STEP:  # a second evaluation per step (at the next or a midpoint level)
        assert len(seen) >= len(expected) + 1 and int(seen[0][0]) == expected[0]
        return
    assert [int(t[0]) for t in seen] == expected
    assert all(t.dtype == torch.long and t.shape == (2,) and bool((t == t[0]).all()) for t in seen)
    assert sampler.timestep_spacing == "leading" or expected[0] == 999


@pytest.mark.parametrize("parameterization", ["v", "x0"])
@pytest.mark.parametrize("cls", [DDPMSampler, DDIMSampler, DPMSolverPP2MSampler])
def test_oracle_with_zero_terminal_snr(cls, parameterization):
    schedule = DiffusionSchedule.from_config(zero_terminal_snr=True)
    sampler = cls(steps=10)
    x0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    out = sampler(
        oracle(schedule, x0, parameterization),
        schedule,
        x0.shape,
        parameterization,
        generator=torch.Generator().manual_seed(3),
    )
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=1e-4)


def test_eps_with_zero_terminal_snr_raises():
    schedule = DiffusionSchedule.from_config(zero_terminal_snr=True)
    x0 = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="v-prediction"):
        DDIMSampler(steps=5)(oracle(schedule, x0, "eps"), schedule, x0.shape, "eps")


def test_clip_x0(sd_schedule):
    x0 = torch.tensor([[3.0, -2.0, 0.5]])
    for sampler in (DDIMSampler(steps=10, clip_x0=True), DPMSolverPP2MSampler(steps=10, clip_x0=True)):
        out = sampler(
            oracle(sd_schedule, x0, "eps"),
            sd_schedule,
            x0.shape,
            "eps",
            generator=torch.Generator().manual_seed(0),
        )
        torch.testing.assert_close(out, torch.tensor([[1.0, -1.0, 0.5]]), atol=1e-4, rtol=0)
    unclipped = DDIMSampler(steps=10)(oracle(sd_schedule, x0, "eps"), sd_schedule, x0.shape, "eps")
    torch.testing.assert_close(unclipped, x0, atol=1e-4, rtol=0)


# -- randomness -------------------------------------------------------------------------------------


def toy_denoiser(xt, t):
    """A non-oracle denoiser whose output depends on x_t and t."""
    return 0.5 * torch.tanh(xt) + (t.float() / 1000).view(-1, *([1] * (xt.ndim - 1)))


def test_ddim_eta0_deterministic_given_x_T(sd_schedule):
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sampler = DDIMSampler(steps=10, eta=0.0)
    a = sampler(
        toy_denoiser, sd_schedule, x_T.shape, "eps", generator=torch.Generator().manual_seed(1), x_T=x_T
    )
    b = sampler(
        toy_denoiser, sd_schedule, x_T.shape, "eps", generator=torch.Generator().manual_seed(2), x_T=x_T
    )
    c = sampler(toy_denoiser, sd_schedule, x_T.shape, "eps", generator=None, x_T=x_T)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    noisy = DDIMSampler(steps=10, eta=1.0)
    d = noisy(
        toy_denoiser, sd_schedule, x_T.shape, "eps", generator=torch.Generator().manual_seed(1), x_T=x_T
    )
    assert not torch.allclose(a, d)


@pytest.mark.parametrize("cls", [DDPMSampler, DDIMSampler, DPMSolverPP2MSampler])
def test_same_seed_same_output(sd_schedule, cls):
    sampler = cls(steps=8)
    shape = (2, 3, 4, 4)
    a = sampler(toy_denoiser, sd_schedule, shape, "v", generator=torch.Generator().manual_seed(7))
    b = sampler(toy_denoiser, sd_schedule, shape, "v", generator=torch.Generator().manual_seed(7))
    c = sampler(toy_denoiser, sd_schedule, shape, "v", generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_ddpm_ancestral_noise_comes_from_generator(sd_schedule):
    """Same x_T, different seeds: DDPM still differs (ancestral noise), DDIM eta=0 does not."""
    x_T = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    sampler = DDPMSampler(steps=10)
    a = sampler(
        toy_denoiser, sd_schedule, x_T.shape, "eps", generator=torch.Generator().manual_seed(1), x_T=x_T
    )
    b = sampler(
        toy_denoiser, sd_schedule, x_T.shape, "eps", generator=torch.Generator().manual_seed(1), x_T=x_T
    )
    c = sampler(
        toy_denoiser, sd_schedule, x_T.shape, "eps", generator=torch.Generator().manual_seed(2), x_T=x_T
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["ddpm", "euler_a", "dpmpp_2s_a", "dpmpp_2m"])
def test_one_generator_per_item_makes_items_independent_of_their_batch(sd_schedule, name):
    """Generators given per item: item k's initial and per-step noise come from its generator alone, so the
    same seed gives the same item alone, in a batch of three at another position, or beside other seeds."""
    sampler = build_sampler(name, steps=6)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sampler(toy_denoiser, sd_schedule, (len(seeds), 3, 4, 4), "eps", generator=gens)

    alone, batch, other = run([5]), run([3, 5, 4]), run([9, 8, 7, 6, 5])
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=0)
    torch.testing.assert_close(other[4], alone[0], rtol=0, atol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sampler(toy_denoiser, sd_schedule, (3, 3, 4, 4), "eps", generator=[torch.Generator()] * 2)


# -- cross-checks ------------------------------------------------------------------------------------


def test_ddpm_full_matches_manual_posterior_loop():
    """All-T DDPM == Ho et al. Alg. 2 written with the schedule's posterior_mean_variance."""
    schedule = DiffusionSchedule(make_beta_schedule("linear", 20, 1e-3, 0.2))
    shape = (3, 5)
    out = DDPMSampler()(
        toy_denoiser, schedule, shape, "eps", generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    for step in reversed(range(20)):
        t = torch.full((3,), step, dtype=torch.long)
        x0 = as_parameterization("eps").to_x0(x, t, toy_denoiser(x, t), schedule)
        mean, _, log_var = schedule.posterior_mean_variance(x0, x, t)
        x = mean + (
            torch.exp(0.5 * log_var) * torch.randn(shape, generator=g, dtype=torch.float64) if step else 0
        )
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x)


def test_ddim_eta1_equals_respaced_ddpm(sd_schedule):
    """With eta = 1 DDIM's step has DDPM's posterior mean and variance (Song et al. 2021, sec. 4.1)."""
    shape = (2, 6)
    ddim = DDIMSampler(steps=12, eta=1.0)(
        toy_denoiser, sd_schedule, shape, "v", generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    ddpm = DDPMSampler(steps=12)(
        toy_denoiser, sd_schedule, shape, "v", generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    torch.testing.assert_close(ddim, ddpm)


# -- Gaussian toy with an exact denoiser -------------------------------------------------------------
# data ~ N(MU, STD^2) (latent-like unit scale). x_T is placed on exact quantiles of the true marginal
# q(x_{T-1}) so that the sample moments carry no Monte-Carlo noise, only solver error.

MU, STD = 1.0, 1.0


def marginal(schedule, t):
    """(alpha_t, std of x_t) for the Gaussian data."""
    abar = schedule.alphas_cumprod[t].item()
    return abar**0.5, (abar * STD**2 + 1 - abar) ** 0.5


def quantile_z(n):
    return torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]


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


# -- construction, devices, progress ---------------------------------------------------------------


def test_build_sampler():
    assert isinstance(build_sampler("ddpm"), DDPMSampler)
    s = build_sampler("ddim", steps=7, eta=0.3)
    assert isinstance(s, DDIMSampler) and s.steps == 7 and s.eta == 0.3
    s = build_sampler("dpmpp_2m_karras", steps=12)
    assert (s.solver, s.karras, s.steps, s.name) == ("dpmpp_2m", True, 12, "dpmpp_2m_karras")
    assert build_sampler("euler_a", eta=0.5).eta == 0.5
    assert DDPMSampler().steps is None and DDIMSampler().steps == 50 and DPMSolverPP2MSampler().steps == 20
    with pytest.raises(ValueError, match="unknown sampler"):
        build_sampler("euler_b")
    with pytest.raises(ValueError, match="DDIM's last step only"):
        build_sampler("euler", set_alpha_to_one=False)
    with pytest.raises(ValueError):
        DDIMSampler(timestep_spacing="uniform")


def test_progress_bar_and_dtype_device(sd_schedule):
    out = DPMSolverPP2MSampler(steps=4)(
        toy_denoiser, sd_schedule, (1, 2), "eps", device="cpu", dtype=torch.float64, progress=True
    )
    assert out.dtype == torch.float64 and out.device.type == "cpu" and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        DDIMSampler(steps=4)(toy_denoiser, sd_schedule, (1, 2), x_T=torch.zeros(2, 2))


# -- timestep conventions and sigma grids ------------------------------------------------------------


def test_conventions_match_diffusers_timesteps():
    """Our spacing + offset arithmetic is diffusers' (DDIM / Euler / DPM-Solver set_timesteps)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from ldm.diffusion import TimestepConvention, sigma_grid

    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    schedule = DiffusionSchedule.from_config()
    for spacing, offset, steps in itertools.product(("leading", "trailing", "linspace"), (0, 1), (7, 10, 30)):
        convention = TimestepConvention(spacing, offset)
        ddim = DDIMScheduler(**config, timestep_spacing=spacing, steps_offset=offset)
        ddim.set_timesteps(steps)
        assert make_timesteps(1000, steps, spacing, offset) == ddim.timesteps.tolist()
        for cls, multistep in ((EulerDiscreteScheduler, False), (DPMSolverMultistepScheduler, True)):
            reference = cls(**config, timestep_spacing=spacing, steps_offset=offset)
            reference.set_timesteps(steps)
            grid = sigma_grid(schedule.alphas_cumprod, steps, convention, extra_point=multistep, integer=multistep)
            torch.testing.assert_close(torch.tensor(grid.timesteps, dtype=torch.float64), reference.timesteps.double(), rtol=0, atol=1e-3)
            torch.testing.assert_close(torch.tensor(grid.sigmas, dtype=torch.float64), reference.sigmas.double(), rtol=1e-5, atol=1e-6)


def test_karras_sigmas():
    from ldm.diffusion import karras_sigmas

    sigmas = karras_sigmas(0.03, 14.6, 10)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    assert all(a > b for a, b in itertools.pairwise(sigmas))
    roots = torch.tensor(sigmas) ** (1 / 7)  # uniform in sigma^(1/rho)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(9), rtol=1e-6, atol=0)


def test_schedule_convention_is_the_default_and_samplers_override_it():
    from ldm.diffusion import SD_CONVENTION

    schedule = DiffusionSchedule.from_config(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    assert schedule.convention == SD_CONVENTION
    assert DDIMSampler(steps=10).timesteps(schedule) == list(range(901, 0, -100))
    assert DDIMSampler(steps=10, timestep_spacing="trailing", steps_offset=0).timesteps(schedule)[0] == 999
    ours = DiffusionSchedule.from_config()
    assert DDIMSampler(steps=10).timesteps(ours)[0] == 999
    # set_alpha_to_one=False: DDIM's last step lands on abar_0, not on the oracle's x0
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out = DDIMSampler(steps=10)(oracle(schedule, x0, "eps"), schedule, x0.shape, "eps")
    assert not torch.allclose(out, x0, atol=1e-3)
    abar0 = float(schedule.alphas_cumprod[0])  # it is the x_t of abar_0 (eps = the oracle's noise)
    assert torch.allclose(out, abar0**0.5 * x0 + (1 - abar0) ** 0.5 * X0.to_eps(
        out, torch.zeros(2, dtype=torch.long), x0, schedule), atol=1e-4)
    with pytest.raises(ValueError, match="spacing"):
        DiffusionSchedule.from_config(timestep_spacing="uniform")


def test_callback_and_img2img(sd_schedule):
    x0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    init = torch.zeros(2, 4)
    for name in ("ddim", "euler", "dpmpp_2m_karras", "euler_a"):
        states = []
        sampler = build_sampler(name, steps=10)
        out = sampler(oracle(sd_schedule, x0, "eps"), sd_schedule, x0.shape, "eps", callback=states.append,
                      generator=torch.Generator().manual_seed(1))
        assert [s["i"] for s in states] == list(range(10)) and torch.equal(states[-1]["x"], out)
        # img2img: strength 0.3 runs the last 3 steps from the noised init; the oracle still lands on x0
        states.clear()
        out = sampler(oracle(sd_schedule, x0, "eps"), sd_schedule, x0.shape, "eps", callback=states.append,
                      init=init, strength=0.3, generator=torch.Generator().manual_seed(1))
        assert len(states) == 3
        torch.testing.assert_close(out, x0, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="strength"):
        build_sampler("euler")(toy_denoiser, sd_schedule, (1, 2), init=torch.zeros(1, 2), strength=0.0)


@pytest.mark.parametrize("name,steps", [("euler", 50), ("heun", 20), ("dpmpp_2m", 20), ("dpmpp_2m_karras", 20),
                                       ("unipc", 10)])
def test_deterministic_solvers_on_gaussian_toy(sd_schedule, name, steps):
    """Exact denoiser for N(MU, STD^2) data: the ODE solvers land on the data's moments (first-order Euler
    needs more steps: at 20 its std is 0.93)."""
    z = quantile_z(2000)
    a_T, m_T = marginal(sd_schedule, 999)
    x_T = a_T * MU + m_T * z
    out = build_sampler(name, steps=steps)(
        gaussian_denoiser(sd_schedule, MU, STD, "eps"), sd_schedule, z.shape, "eps", x_T=x_T, dtype=torch.float64
    )
    assert out.mean().item() == pytest.approx(MU, abs=0.05)
    assert out.std().item() == pytest.approx(STD, abs=0.05)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "heun", "dpmpp_2s_a", "ddim",
                                  "ddpm"])
def test_sampler_configs_build_and_take_convention_overrides(compose_cfg, name):
    from hydra.utils import instantiate

    overrides = [f"model/sampler={name}", "model.sampler.timestep_spacing=leading", "model.sampler.steps_offset=1"]
    cfg = compose_cfg(["experiment=txt2img", *overrides])
    sampler = instantiate(cfg.model.sampler)
    assert sampler.name == name
    schedule = instantiate(cfg.model.schedule)
    assert schedule.convention.spacing == "trailing"  # ours, from conf/model/schedule
    assert sampler.convention(schedule).spacing == "leading" and sampler.convention(schedule).steps_offset == 1
