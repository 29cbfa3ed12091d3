"""The diffusion loss as objects: parameterisations (eps / v / x0), weightings, the loss they make, and how
``model/loss=...`` / ``model.parameterization`` / ``model.min_snr_gamma`` reach them."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from ldm.diffusion import (
    EPS,
    PARAMETERIZATIONS,
    X0,
    DiffusionSchedule,
    MinSNRWeighting,
    PlainWeighting,
    V,
    as_parameterization,
    build_loss,
)
from ldm.io.single_file_export import _modelspec
from ldm.models.latent_diffusion import LatentDiffusion
from tests.conftest import CONF

LOSS_PRESETS = sorted(p.stem for p in (CONF / "model" / "loss").glob("*.yaml"))


@pytest.fixture(scope="module")
def schedule():
    return DiffusionSchedule.from_config("scaled_linear", num_timesteps=1000)


def test_registry_gives_one_shared_object_per_name():
    assert [as_parameterization(name) for name in PARAMETERIZATIONS] == [EPS, V, X0]
    assert [p.name for p in (EPS, V, X0)] == ["eps", "v", "x0"]
    assert as_parameterization(V) is V
    assert pickle.loads(pickle.dumps(V)) is V and copy.deepcopy(EPS) is EPS
    expected = r"parameterization must be one of \('eps', 'v', 'x0'\), got 'score'"
    with pytest.raises(ValueError, match=expected):
        as_parameterization("score")


@pytest.mark.parametrize("name", PARAMETERIZATIONS)
def test_min_snr_is_the_same_objective_whatever_the_network_predicts(schedule, name):
    """A prediction of x0 with a given error, written in each parameterisation, gets the same weighted loss:
    min(snr, gamma) x MSE(x0) (the weighting is defined on x0 and converted by ``x0_loss_scale``)."""
    g = torch.Generator().manual_seed(0)
    x0, noise, error = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([5, 200, 600, 990])
    xt = schedule.q_sample(x0, t, noise)
    x0_hat = x0 + 0.1 * error
    param = as_parameterization(name)
    output = param.target(x0_hat, X0.to_eps(xt, t, x0_hat, schedule), t, schedule)
    loss = build_loss(name, min_snr_gamma=5.0)(output, x0, noise, t, schedule, reduction="none")
    snr = schedule.snr(t).double()
    expected = torch.clamp(snr, max=5.0) * (0.1 * error).square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    assert snr.min() < 5.0 < snr.max()  # both sides of the clip are exercised
    plain = build_loss(name)(output, x0, noise, t, schedule, reduction="none").double()
    torch.testing.assert_close(
        plain, param.x0_loss_scale(snr) * (0.1 * error).square().mean(dim=(1, 2, 3)), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("name", PARAMETERIZATIONS)
def test_sigma_space_denoised_equals_the_vp_conversion(schedule, name):
    """``denoised`` (sigma samplers, x = x_t / alpha) and ``to_x0`` (VP samplers) agree at the same level."""
    param = as_parameterization(name)
    g = torch.Generator().manual_seed(1)
    xt, output = (torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    for step in (10, 400, 900):
        t = torch.tensor([step])
        abar = float(schedule.alphas_cumprod[step])
        sigma = math.sqrt((1 - abar) / abar)
        torch.testing.assert_close(
            param.denoised(xt / math.sqrt(abar), sigma, output), param.to_x0(xt, t, output, schedule)
        )


def test_only_eps_is_undefined_at_zero_snr():
    assert [p.finite_at_zero_snr for p in (EPS, V, X0)] == [False, True, True]


def test_build_loss_maps_the_keys_to_objects():
    assert isinstance(build_loss("v").weighting, PlainWeighting)
    weighted = build_loss("x0", 3.0)
    assert weighted.parameterization is X0 and isinstance(weighted.weighting, MinSNRWeighting)
    assert weighted.weighting.gamma == 3.0
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        build_loss("eps", 0.0)


def test_model_reads_its_parameterization_from_hparams():
    """Checkpoints store the name (hparams); a fine-tune sets it from its base after construction."""
    model = LatentDiffusion(
        unet=None,
        vae=None,
        text_encoder=None,
        schedule=None,
        sampler=None,
        optimizer=None,
        parameterization="v",
        min_snr_gamma=5.0,
    )
    assert model.parameterization is V and model.diffusion_loss.weighting.gamma == 5.0
    model.hparams.parameterization = "x0"
    assert model.parameterization is X0
    with pytest.raises(ValueError, match="parameterization must be one of"):
        LatentDiffusion(
            unet=None,
            vae=None,
            text_encoder=None,
            schedule=None,
            sampler=None,
            optimizer=None,
            parameterization="epsilon",
        )


def test_single_file_metadata_asks_the_object():
    spec = _modelspec({"version": "v2", "parameterization": "v", "resolution": 768})
    assert spec["modelspec.architecture"] == "stable-diffusion-v2-768-v"
    assert spec["modelspec.prediction_type"] == "v"
    assert (
        _modelspec({"version": "v1", "parameterization": "eps", "resolution": 512})[
            "modelspec.prediction_type"
        ]
        == "epsilon"
    )
    assert (
        _modelspec({"version": "v2", "parameterization": "x0", "resolution": 512})["modelspec.architecture"]
        == "stable-diffusion-v2"
    )


def test_loss_presets_cover_every_parameterization_with_and_without_min_snr():
    assert LOSS_PRESETS == sorted([*PARAMETERIZATIONS, *(f"{p}_min_snr" for p in PARAMETERIZATIONS)])


@pytest.mark.parametrize("preset", LOSS_PRESETS)
def test_loss_group_sets_the_model_keys(compose_cfg, preset):
    cfg = compose_cfg(["experiment=txt2img", f"model/loss={preset}"])
    loss = build_loss(cfg.model.parameterization, cfg.model.min_snr_gamma)
    assert loss.parameterization.name == preset.removesuffix("_min_snr")
    assert isinstance(loss.weighting, MinSNRWeighting if preset.endswith("_min_snr") else PlainWeighting)


def test_plain_keys_still_override(compose_cfg):
    # txt2img's default is v + Min-SNR-5 (the convergence grid, docs/results.md); SD-style fine-tunes keep eps
    default = compose_cfg(["experiment=txt2img"])
    assert (default.model.parameterization, default.model.min_snr_gamma) == ("v", 5.0)
    assert compose_cfg(["experiment=txt2img_sdxl"]).model.parameterization == "eps"
    cfg = compose_cfg(
        ["experiment=txt2img", "model/loss=v_min_snr", "model.parameterization=x0", "model.min_snr_gamma=2.0"]
    )
    assert (cfg.model.parameterization, cfg.model.min_snr_gamma) == ("x0", 2.0)
