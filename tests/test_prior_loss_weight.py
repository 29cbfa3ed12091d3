"""One name for one idea: DreamBooth's prior-preservation weight is the fine-tuning core's
``model.prior_loss_weight`` (conf/model/finetune.yaml), passed to whichever method's ``loss()`` hook; the old
``model.method.prior_loss_weight`` is refused with a line naming the new key, and checkpoints written before
the move still load."""

from __future__ import annotations

import subprocess
import sys

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import CONF, ROOT

BATCH = {"is_regularization": torch.tensor([False, False, True, True])}
LOSSES = torch.tensor([1.0, 3.0, 10.0, 20.0])


@pytest.mark.parametrize("method", ["lora", "full", "textual_inversion", "hypernetwork"])
def test_the_core_weights_class_items_for_every_method(compose_cfg, method):
    cfg = compose_cfg(["experiment=dreambooth", f"model/method={method}", "model.prior_loss_weight=0.5"])
    model = hydra.utils.instantiate(cfg.model, _convert_="all")  # the base loads in setup(): not needed here
    assert float(model.reduce_loss(LOSSES, BATCH)) == pytest.approx(2.0 + 0.5 * 15.0)
    model.hparams.prior_loss_weight = None
    assert float(model.reduce_loss(LOSSES, BATCH)) == pytest.approx(8.5)  # one plain mean


def test_the_weight_has_one_name():
    assert OmegaConf.load(CONF / "model" / "finetune.yaml").prior_loss_weight is None
    for path in (CONF / "model" / "method").glob("*.yaml"):
        assert "prior_loss_weight" not in OmegaConf.load(path), path
    for path in (CONF / "experiment").glob("*.yaml"):
        assert "prior_loss_weight" not in OmegaConf.load(path).get("model", {}).get("method", {}), path
    from ldm.models.finetune import full, hypernetwork, lora, method, textual_inversion

    classes = [
        method.FineTuneMethod,
        full.FullUNet,
        hypernetwork.Hypernetwork,
        lora.LoRA,
        textual_inversion.TextualInversion,
    ]
    assert not any(hasattr(cls, "name") for cls in classes)  # FineTuneMethod.name was never read


def test_the_old_key_is_refused_naming_the_new_one():
    from ldm.utils.task import renamed_override

    assert renamed_override(["experiment=dreambooth", "model.prior_loss_weight=0"]) is None
    line = renamed_override(["experiment=dreambooth", "model.method.prior_loss_weight=0"])
    assert line.startswith("error: model.method.prior_loss_weight was renamed: use model.prior_loss_weight=0")
    done = subprocess.run(
        [sys.executable, "train.py", "experiment=dreambooth", "++model.method.prior_loss_weight=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("error: model.method.prior_loss_weight was renamed: use model.prior_loss_weight=0")
    )


def test_a_config_written_before_the_move_still_builds(compose_cfg):
    from ldm.models.checkpoint import _for_inference
    from ldm.models.model_config import build_from_config

    config = OmegaConf.to_container(compose_cfg(["experiment=dreambooth"]).model, resolve=True)
    # the layout old checkpoints carry
    weight = config["method"]["prior_loss_weight"] = config.pop("prior_loss_weight")
    model = build_from_config(_for_inference(config), "old.ckpt")
    assert (
        weight > 0
        and model.hparams.prior_loss_weight == weight
        and "prior_loss_weight" not in model.hparams.get("method", {})
    )
