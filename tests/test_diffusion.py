"""Schedules, parameterisations, DDPM posterior, losses and classifier-free guidance."""

import math

import pytest
import torch

from ldm.diffusion import (
    DiffusionLoss,
    DiffusionSchedule,
    MinSNRWeighting,
    as_parameterization,
    build_loss,
    classifier_free_guidance,
    make_beta_schedule,
    rescale_zero_terminal_snr,
    sample_noise,
)

PARAMS = ("eps", "v", "x0")


@pytest.fixture
def schedule():
    return DiffusionSchedule.from_config("scaled_linear", num_timesteps=1000)


# -- schedules ---------------------------------------------------------------------------------


def test_scaled_linear_endpoints_and_shape():
    betas = make_beta_schedule("scaled_linear", 1000, 0.00085, 0.012)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    # the square of a linspace, not a linspace: the midpoint is ((sqrt a + sqrt b) / 2)^2
    mid = make_beta_schedule("scaled_linear", 3, 0.00085, 0.012)[1].item()
    assert mid == pytest.approx(((0.00085**0.5 + 0.012**0.5) / 2) ** 2, rel=1e-12)
    lin_mid = make_beta_schedule("linear", 3, 0.00085, 0.012)[1].item()
    assert lin_mid == pytest.approx((0.00085 + 0.012) / 2, rel=1e-12)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_monotonic_in_unit_interval(kind):
    s = DiffusionSchedule.from_config(kind, num_timesteps=1000)
    abar = s.alphas_cumprod
    assert s.num_timesteps == 1000 and abar.dtype == torch.float64
    assert bool((abar[1:] < abar[:-1]).all())
    assert bool((abar > 0).all()) and bool((abar < 1).all())


def test_cosine_betas_in_open_interval_and_follow_formula():
    betas = make_beta_schedule("cosine", 1000)
    assert bool((betas > 0).all()) and bool((betas < 1).all())
    assert betas.max().item() <= 0.999
    # abar_t = f(t)/f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2), checked away from the clipped end
    s_ = 8e-3
    f = [math.cos((t / 1000 + s_) / (1 + s_) * math.pi / 2) ** 2 for t in (0, 500)]
    abar = torch.cumprod(1 - betas, 0)
    assert abar[499].item() == pytest.approx(f[1] / f[0], rel=1e-9)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError):
        make_beta_schedule("quadratic")


def test_zero_terminal_snr_rescale():
    betas = make_beta_schedule("scaled_linear", 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    s0, s1 = DiffusionSchedule(betas), DiffusionSchedule(rescaled)
    assert s1.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert s0.alphas_cumprod[-1].item() > 1e-3
    t0 = torch.tensor([0])
    assert s1.snr(t0).item() == pytest.approx(s0.snr(t0).item(), rel=1e-5)
    assert bool((s1.alphas_cumprod[1:] <= s1.alphas_cumprod[:-1]).all())
    assert s1.betas[-1].item() == pytest.approx(1.0)
    via_config = DiffusionSchedule.from_config("scaled_linear", zero_terminal_snr=True)
    torch.testing.assert_close(via_config.betas, rescaled)


def test_schedule_rejects_bad_betas():
    with pytest.raises(ValueError):
        DiffusionSchedule(torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError):
        DiffusionSchedule(torch.tensor([0.1, 1.5]))


# -- forward process and parameterisations ----------------------------------------------------


def test_q_sample_statistics(schedule):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 1.5)
    t = torch.full((n,), 400, dtype=torch.long)
    noise = torch.randn(n, 1, generator=g)
    xt = schedule.q_sample(x0, t, noise)
    abar = schedule.alphas_cumprod[400].item()
    assert xt.mean().item() == pytest.approx(1.5 * abar**0.5, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.02)


def test_gather_broadcasts_per_sample(schedule):
    x0 = torch.ones(3, 2, 4, 4)
    noise = torch.zeros_like(x0)
    t = torch.tensor([0, 500, 999])
    xt = schedule.q_sample(x0, t, noise)
    expected = schedule.alphas_cumprod[t].sqrt().float()
    torch.testing.assert_close(xt[:, 0, 0, 0], expected)
    assert xt.dtype == torch.float32
    assert schedule.q_sample(x0.double(), t, noise.double()).dtype == torch.float64


@pytest.mark.parametrize("parameterization", PARAMS)
def test_target_prediction_round_trip(schedule, parameterization):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    xt = schedule.q_sample(x0, t, noise)
    param = as_parameterization(parameterization)
    target = param.target(x0, noise, t, schedule)
    torch.testing.assert_close(param.to_x0(xt, t, target, schedule), x0)
    torch.testing.assert_close(param.to_eps(xt, t, target, schedule), noise)


def test_v_target_closed_form(schedule):
    x0, noise = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([100, 900])
    a = schedule.alphas_cumprod[t].sqrt()[:, None]
    expected = a * noise - (1 - a**2).sqrt() * x0
    torch.testing.assert_close(as_parameterization("v").target(x0, noise, t, schedule), expected)
    with pytest.raises(ValueError, match="parameterization must be one of"):
        as_parameterization("score")


def test_v_round_trip_with_zero_terminal_snr():
    s = DiffusionSchedule.from_config(zero_terminal_snr=True)
    x0, noise = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    t = torch.tensor([999, 998])
    xt = s.q_sample(x0, t, noise)
    torch.testing.assert_close(xt[0], noise[0])  # pure noise at the last step
    param = as_parameterization("v")
    v = param.target(x0, noise, t, s)
    torch.testing.assert_close(param.to_x0(xt, t, v, s), x0)
    torch.testing.assert_close(param.to_eps(xt, t, v, s), noise)


def test_snr(schedule):
    t = torch.tensor([0, 999])
    abar = schedule.alphas_cumprod[t]
    snr = schedule.snr(t)
    assert snr.shape == (2,) and snr.dtype == torch.float32
    torch.testing.assert_close(snr, (abar / (1 - abar)).float())


# -- DDPM posterior -----------------------------------------------------------------------------


def test_posterior_against_closed_form():
    betas = make_beta_schedule("linear", 50, 1e-3, 0.05)
    s = DiffusionSchedule(betas)
    b = betas.tolist()
    abar, prod = [], 1.0
    for beta in b:
        prod *= 1 - beta
        abar.append(prod)
    ts = [0, 1, 7, 30, 49]
    x0 = torch.randn(len(ts), 2, dtype=torch.float64)
    xt = torch.randn(len(ts), 2, dtype=torch.float64)
    mean, var, log_var = s.posterior_mean_variance(x0, xt, torch.tensor(ts))
    assert var.shape == (len(ts), 1)
    for i, t in enumerate(ts):
        abar_prev = abar[t - 1] if t > 0 else 1.0
        beta_tilde = (1 - abar_prev) / (1 - abar[t]) * b[t]
        c_x0 = math.sqrt(abar_prev) * b[t] / (1 - abar[t])
        c_xt = math.sqrt(1 - b[t]) * (1 - abar_prev) / (1 - abar[t])
        assert var[i].item() == pytest.approx(beta_tilde, rel=1e-10, abs=1e-15)
        torch.testing.assert_close(mean[i], c_x0 * x0[i] + c_xt * xt[i])
        if t > 0:
            assert log_var[i].item() == pytest.approx(math.log(beta_tilde), rel=1e-10)
    # t = 0 has zero variance; the clipped log variance reuses t = 1's
    beta_tilde_1 = (1 - abar[0]) / (1 - abar[1]) * b[1]
    assert log_var[0].item() == pytest.approx(math.log(beta_tilde_1), rel=1e-10)
    assert var[0].item() == 0.0


# -- losses -------------------------------------------------------------------------------------


def test_min_snr_weights_by_hand():
    snr = torch.tensor([0.5, 5.0, 20.0])
    weighting = MinSNRWeighting(5.0)
    torch.testing.assert_close(weighting(snr, as_parameterization("eps")), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(
        weighting(snr, as_parameterization("v")), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21])
    )
    torch.testing.assert_close(weighting(snr, as_parameterization("x0")), torch.tensor([0.5, 5.0, 5.0]))
    # zero SNR (zero-terminal-SNR schedules): finite weights
    zero = weighting(torch.tensor([0.0]), as_parameterization("eps"))
    assert torch.isfinite(zero).all() and zero.item() == 1.0


def test_offset_noise_shape_and_statistics():
    x0 = torch.zeros(64, 4, 16, 16)
    plain = sample_noise(x0, 0.0, torch.Generator().manual_seed(0))
    assert plain.shape == x0.shape
    assert plain.std().item() == pytest.approx(1.0, abs=0.02)
    offset = sample_noise(x0, 0.5, torch.Generator().manual_seed(0))
    assert offset.shape == x0.shape
    # per-(sample, channel) spatial means spread with std ~ sqrt(0.25 + 1/256) instead of 1/16
    channel_means = offset.mean(dim=(2, 3))
    assert channel_means.std().item() == pytest.approx((0.25 + 1 / 256) ** 0.5, rel=0.15)
    assert plain.mean(dim=(2, 3)).std().item() < 0.1
    assert offset.var().item() == pytest.approx(1.25, rel=0.1)
    again = sample_noise(x0, 0.5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(offset, again)


def test_diffusion_loss_plain_is_mse(schedule):
    out, noise, x0 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([1, 100, 500, 999])
    loss = DiffusionLoss()(out, x0, noise, t, schedule)  # eps: the target is the noise
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(out, noise))
    per_sample = DiffusionLoss("eps")(out, x0, noise, t, schedule, reduction="none")
    assert per_sample.shape == (4,)
    torch.testing.assert_close(per_sample, ((out - noise) ** 2).mean(dim=(1, 2, 3)))
    x0_loss = DiffusionLoss("x0")(out, x0, noise, t, schedule, reduction="none")
    torch.testing.assert_close(x0_loss, ((out - x0) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("parameterization", PARAMS)
def test_diffusion_loss_min_snr_weighting(schedule, parameterization):
    out, x0, noise = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    t = torch.tensor([1, 100, 500, 999])
    loss_fn = build_loss(parameterization, min_snr_gamma=5.0)
    weights = MinSNRWeighting(5.0)(schedule.snr(t), loss_fn.parameterization)
    loss = loss_fn(out, x0, noise, t, schedule, reduction="none")
    target = loss_fn.parameterization.target(x0, noise, t, schedule)
    torch.testing.assert_close(loss, ((out - target) ** 2).mean(dim=(1, 2, 3)) * weights)
    assert not torch.allclose(weights, torch.ones(4))


# -- classifier-free guidance ---------------------------------------------------------------------


class CountingModel:
    """out = x * w(t) + mean(context) per sample; counts calls and batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append(x.shape[0])
        assert x.shape[0] == t.shape[0] == context.shape[0]
        return x * (1 + t.float().view(-1, 1, 1, 1) / 1000) + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_cfg_scale_one_is_conditional_single_pass():
    model = CountingModel()
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 50, 500])
    cond, uncond = torch.randn(3, 7, 8), torch.zeros(3, 7, 8)
    out = classifier_free_guidance(model, cond, uncond, 1.0)(x, t)
    torch.testing.assert_close(out, CountingModel()(x, t, cond))
    assert model.calls == [3]


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_cfg_combination_in_one_batched_forward(scale):
    model = CountingModel()
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([5, 50, 500])
    cond, uncond = torch.randn(3, 7, 8), torch.randn(1, 7, 8)
    out = classifier_free_guidance(model, cond, uncond, scale)(x, t)
    assert model.calls == [6]
    ref = CountingModel()
    c = ref(x, t, cond)
    u = ref(x, t, uncond.expand(3, 7, 8))
    torch.testing.assert_close(out, u + scale * (c - u))
    assert not torch.allclose(c, u)


def test_hydra_targets_build_schedule_and_samplers():
    import hydra.utils as hydra_utils

    schedule = hydra_utils.instantiate(
        {
            "_target_": "ldm.diffusion.DiffusionSchedule.from_config",
            "num_timesteps": 100,
            "zero_terminal_snr": True,
        }
    )
    assert isinstance(schedule, DiffusionSchedule) and schedule.num_timesteps == 100
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)
    sampler = hydra_utils.instantiate({"_target_": "ldm.diffusion.DDIMSampler", "steps": 10, "eta": 0.5})
    assert type(sampler).__name__ == "DDIMSampler" and sampler.steps == 10 and sampler.eta == 0.5


def test_schedule_pickles_without_device_cache(schedule):
    import pickle

    schedule.q_sample(torch.zeros(1, 2), torch.tensor([3]), torch.ones(1, 2))  # fills the cache
    clone = pickle.loads(pickle.dumps(schedule))
    torch.testing.assert_close(clone.alphas_cumprod, schedule.alphas_cumprod)
    assert clone._device_tables == {}
