"""Samplers: oracle recovery, determinism/seeding, cross-checks, construction, callbacks and img2img
(timestep grids: test_sampler_conventions.py; the Gaussian toy: test_sampler_gaussian_toy.py)."""

import pytest
import torch

from ldm.diffusion import (
    DDIMSampler,
    DDPMSampler,
    DiffusionSchedule,
    DPMSolverPP2MSampler,
    as_parameterization,
    build_sampler,
    make_beta_schedule,
)
from tests.sampler_toys import PARAMS, oracle, toy_denoiser

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


def test_callback_and_img2img(sd_schedule):
    x0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    init = torch.zeros(2, 4)
    for name in ("ddim", "euler", "dpmpp_2m_karras", "euler_a"):
        states = []
        sampler = build_sampler(name, steps=10)
        out = sampler(
            oracle(sd_schedule, x0, "eps"),
            sd_schedule,
            x0.shape,
            "eps",
            callback=states.append,
            generator=torch.Generator().manual_seed(1),
        )
        assert [s["i"] for s in states] == list(range(10)) and torch.equal(states[-1]["x"], out)
        # img2img: strength 0.3 runs the last 3 steps from the noised init; the oracle still lands on x0
        states.clear()
        out = sampler(
            oracle(sd_schedule, x0, "eps"),
            sd_schedule,
            x0.shape,
            "eps",
            callback=states.append,
            init=init,
            strength=0.3,
            generator=torch.Generator().manual_seed(1),
        )
        assert len(states) == 3
        torch.testing.assert_close(out, x0, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="strength"):
        build_sampler("euler")(toy_denoiser, sd_schedule, (1, 2), init=torch.zeros(1, 2), strength=0.0)
