"""Timestep grids: spacing, offsets and sigma grids as diffusers computes them, the schedule's convention as
the default, and the sampler configs (conf/model/sampler/) that take convention overrides."""

import itertools

import pytest
import torch

from ldm.diffusion import X0, DDIMSampler, DiffusionSchedule, make_timesteps
from tests.conftest import CONF
from tests.sampler_toys import oracle

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
            grid = sigma_grid(
                schedule.alphas_cumprod, steps, convention, extra_point=multistep, integer=multistep
            )
            torch.testing.assert_close(
                torch.tensor(grid.timesteps, dtype=torch.float64),
                reference.timesteps.double(),
                rtol=0,
                atol=1e-3,
            )
            torch.testing.assert_close(
                torch.tensor(grid.sigmas, dtype=torch.float64),
                reference.sigmas.double(),
                rtol=1e-5,
                atol=1e-6,
            )


def test_karras_sigmas():
    from ldm.diffusion import karras_sigmas

    sigmas = karras_sigmas(0.03, 14.6, 10)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)
    assert all(a > b for a, b in itertools.pairwise(sigmas))
    roots = torch.tensor(sigmas) ** (1 / 7)  # uniform in sigma^(1/rho)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(9), rtol=1e-6, atol=0)


def test_sd_convention_leaves_the_spacing_to_each_sampler():
    """SD 1.x/2.x bases (SD_CONVENTION): DDIM/DDPM lead with offset 1 (diffusers' DDIM/DDPM default, CompVis'
    and AUTOMATIC1111's DDIM), the k-samplers take linspace (their diffusers schedulers' default, A1111's
    k-diffusion grid); an explicit override still wins."""
    from ldm.diffusion import SD_CONVENTION, build_sampler

    schedule = DiffusionSchedule.from_config(kind="scaled_linear", **SD_CONVENTION.as_config())
    assert build_sampler("ddim", steps=10).timesteps(schedule) == list(range(901, 0, -100))
    assert build_sampler("ddpm", steps=10).timesteps(schedule)[0] == 901
    for name in ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2s_a", "unipc"):
        sampler = build_sampler(name, steps=10)
        assert sampler.convention(schedule).spacing == "linspace" and sampler.timesteps(schedule)[0] == 999
    assert build_sampler("euler", steps=10, timestep_spacing="leading").timesteps(schedule)[0] == 901
    with pytest.raises(ValueError, match="resolves"):
        make_timesteps(1000, 10, "sampler_default")


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_karras_conventions_span_their_references_ranges(spacing):
    """karras_convention="a1111": k-diffusion's get_sigmas_karras(n, model sigma_min, sigma_max) whatever the
    spacing (diffusers' DPM-Solver++ uses that range too); "diffusers": EulerDiscreteScheduler's
    use_karras_sigmas=True range, the spaced steps' sigmas (8.39 -> 0.041 at 10 leading steps)."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from ldm.diffusion import TimestepConvention, build_sampler

    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    schedule = DiffusionSchedule.from_config(
        kind="scaled_linear", **TimestepConvention(spacing, 1, False).as_config()
    )
    full = DPMSolverMultistepScheduler(**config, timestep_spacing=spacing, use_karras_sigmas=True)
    spaced = EulerDiscreteScheduler(**config, timestep_spacing=spacing, use_karras_sigmas=True)
    for reference in (full, spaced):
        reference.set_timesteps(10)
    a1111 = torch.tensor(build_sampler("euler_karras", steps=10).grid(schedule).sigmas, dtype=torch.float64)
    diffusers_euler = build_sampler("euler_karras", steps=10, karras_convention="diffusers").grid(schedule)
    table = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()
    assert a1111[0] == pytest.approx(float(table[-1])) and a1111[-2] == pytest.approx(float(table[0]))
    torch.testing.assert_close(a1111, full.sigmas.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor(diffusers_euler.sigmas, dtype=torch.float64),
        spaced.sigmas.double(),
        rtol=1e-5,
        atol=1e-6,
    )
    torch.testing.assert_close(
        torch.tensor(diffusers_euler.timesteps, dtype=torch.float64),
        spaced.timesteps.double(),
        rtol=0,
        atol=2e-3,
    )
    if spacing == "leading":
        assert diffusers_euler.sigmas[0] == pytest.approx(8.39, abs=0.01) and a1111[0] > 14.6
    try:  # the A1111 convention's own reference, where k-diffusion installs (it pins its own torch)
        from k_diffusion.sampling import get_sigmas_karras
    except ImportError:
        return
    expected = get_sigmas_karras(10, float(table[0]), float(table[-1])).double()
    torch.testing.assert_close(a1111, expected, rtol=1e-5, atol=1e-6)


def test_schedule_convention_is_the_default_and_samplers_override_it():
    from ldm.diffusion import SD_CONVENTION

    schedule = DiffusionSchedule.from_config(
        timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False
    )
    assert schedule.convention == SD_CONVENTION.replace(spacing="leading")
    assert DDIMSampler(steps=10).timesteps(schedule) == list(range(901, 0, -100))
    assert DDIMSampler(steps=10, timestep_spacing="trailing", steps_offset=0).timesteps(schedule)[0] == 999
    ours = DiffusionSchedule.from_config()
    assert DDIMSampler(steps=10).timesteps(ours)[0] == 999
    # set_alpha_to_one=False: DDIM's last step lands on abar_0, not on the oracle's x0
    x0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out = DDIMSampler(steps=10)(oracle(schedule, x0, "eps"), schedule, x0.shape, "eps")
    assert not torch.allclose(out, x0, atol=1e-3)
    abar0 = float(schedule.alphas_cumprod[0])  # it is the x_t of abar_0 (eps = the oracle's noise)
    assert torch.allclose(
        out,
        abar0**0.5 * x0 + (1 - abar0) ** 0.5 * X0.to_eps(out, torch.zeros(2, dtype=torch.long), x0, schedule),
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="spacing"):
        DiffusionSchedule.from_config(timestep_spacing="uniform")


@pytest.mark.parametrize(
    "name", ["dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "heun", "dpmpp_2s_a", "unipc", "ddim", "ddpm"]
)
def test_sampler_configs_build_and_take_convention_overrides(compose_cfg, name):
    from hydra.utils import instantiate

    overrides = [
        f"model/sampler={name}",
        "model.sampler.timestep_spacing=leading",
        "model.sampler.steps_offset=1",
    ]
    cfg = compose_cfg(["experiment=txt2img", *overrides])
    sampler = instantiate(cfg.model.sampler)
    assert sampler.name == name
    schedule = instantiate(cfg.model.schedule)
    assert schedule.convention.spacing == "trailing"  # ours, from conf/model/schedule
    assert (
        sampler.convention(schedule).spacing == "leading" and sampler.convention(schedule).steps_offset == 1
    )


def test_every_sampler_has_a_config():
    """`model/sampler=<name>` exists for every sampler `sample.py --sampler` knows (Karras variants but
    dpmpp_2m_karras are `model.sampler.karras=true`)."""
    from ldm.diffusion.samplers.sigma_solvers import SOLVERS

    configs = {p.stem for p in (CONF / "model" / "sampler").glob("*.yaml")}
    assert {"ddpm", "ddim", *SOLVERS} <= configs, sorted({"ddpm", "ddim", *SOLVERS} - configs)


def test_unipc_config_builds_and_samples(compose_cfg):
    """model/sampler=unipc: the UniPC solver, which lands on Gaussian data's moments in 10 steps."""
    from hydra.utils import instantiate

    from tests.sampler_toys import MU, STD, gaussian_denoiser, quantile_z

    cfg = compose_cfg(["experiment=txt2img", "model/sampler=unipc", "model.sampler.steps=10"])
    sampler, schedule = instantiate(cfg.model.sampler), instantiate(cfg.model.schedule)
    assert (type(sampler).__name__, sampler.solver, sampler.name, sampler.steps) == (
        "SigmaSampler",
        "unipc",
        "unipc",
        10,
    )
    z = quantile_z(2000)
    abar = float(schedule.alphas_cumprod[-1])
    x_T = abar**0.5 * MU + (abar * STD**2 + 1 - abar) ** 0.5 * z
    out = sampler(
        gaussian_denoiser(schedule, MU, STD, "eps"), schedule, z.shape, "eps", x_T=x_T, dtype=torch.float64
    )
    assert out.mean().item() == pytest.approx(MU, abs=0.05) and out.std().item() == pytest.approx(
        STD, abs=0.05
    )
