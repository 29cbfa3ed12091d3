"""The one tiny-UNet preset (``ldm.modules.tiny_unet``): Hydra's ``model/unet=tiny`` and the fast_dev_run
stand-in base are built from the same values the tests use."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ldm.models.finetune.fallback import tiny_random_base
from ldm.modules.tiny_unet import TINY_UNET, tiny_unet, tiny_unet_config
from tests.conftest import CONF


def test_the_hydra_preset_is_the_python_preset():
    config = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "unet" / "tiny.yaml"))
    assert config.pop("_target_") == "ldm.modules.unet.UNetModel"
    assert config == TINY_UNET


def test_the_fast_dev_run_base_uses_the_preset():
    unet = tiny_random_base(32).unet
    reference = tiny_unet()
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }
    assert unet.context_dim == TINY_UNET["context_dim"] and unet.model_channels == TINY_UNET["model_channels"]


def test_changes_are_checked_and_leave_the_preset_alone():
    config = tiny_unet_config(num_heads=2, context_dim=32)
    assert (config["num_heads"], config["context_dim"], config["model_channels"]) == (2, 32, 32)
    assert TINY_UNET["num_heads"] == 4 and TINY_UNET["context_dim"] == 64
    with pytest.raises(TypeError, match="model_channel"):
        tiny_unet_config(model_channel=16)
