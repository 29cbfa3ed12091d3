"""``model.method.algo=locon|loha|lokr|dora`` through train.py at test size: only the adapter trains, the
file exported at the end of fit is in the LyCORIS (or kohya / PEFT) layout and reproduces the trained UNet
when loaded into a fresh base, and a run resumed from its checkpoint ends exactly where an uninterrupted one
does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.io.lora_any import load_lora
from ldm.io.safe_load import read_safetensors_metadata
from ldm.models.checkpoint import load_lightning_model
from tests.test_finetune_lora import base_ckpt, lora_overrides  # noqa: F401 - base_ckpt is a fixture
from train import train

ALGOS = {  # algo -> (extra overrides, ss_network_module, the kind of tensors the file holds)
    "locon": (["model.method.conv_rank=2", "model.method.conv_alpha=1"], "networks.lora", "lora_down.weight"),
    "loha": (["model.method.rank=2", "model.method.alpha=1"], "lycoris.kohya", "hada_w1_a"),
    "lokr": (["model.method.factor=4"], "lycoris.kohya", "lokr_w1"),
    "dora": ([], "lycoris.kohya", "dora_scale"),
}


def fit(compose_cfg, base, algo, name, extra=()):
    overrides, *_ = ALGOS[algo]
    cfg = compose_cfg(
        lora_overrides(base, ["data.cache_dir=null", f"model.method.algo={algo}", *overrides, *extra]),
        output_name=name,
    )
    _, objects = train(cfg)
    return cfg, objects


@pytest.mark.parametrize("algo", list(ALGOS))
def test_fit_exports_the_algorithm_and_resumes_exactly(compose_cfg, base_ckpt, algo):  # noqa: F811
    _, module_name, marker = ALGOS[algo]
    steps = ["trainer.max_steps=4", "trainer.val_check_interval=2"]
    cfg, objects = fit(compose_cfg, base_ckpt, algo, "straight", steps)
    model = objects["model"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("unet.", "method.")) for n in trainable)
    adapters = [m for m in model.unet.modules() if hasattr(m, "adapter_tensors")]
    assert adapters and {m.algo for m in adapters} == {"lora" if algo == "locon" else algo}
    if algo == "locon":  # the 3x3 convolutions joined the targets, with their own rank
        assert {m.rank for m in adapters if m.weight.ndim == 4 and m.weight.shape[-1] == 3} == {2}

    exported = Path(cfg.paths.output_dir) / "adapters" / "lora_finetune.safetensors"
    meta = read_safetensors_metadata(exported)
    assert meta["ss_network_module"] == module_name
    if algo == "locon":  # kohya's conv_dim / conv_alpha for the 3x3 convolutions
        assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    else:
        assert json.loads(meta["ss_network_args"])["algo"] == {"dora": "lora"}.get(algo, algo)
    fresh = load_lightning_model(base_ckpt).unet_ema.module
    summary = load_lora(exported, unet=fresh, merge=True)
    assert summary["modules"] == len(adapters)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 20, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, ctx), model.unet(x, t, ctx), atol=1e-5, rtol=1e-4)
    assert any(marker in key for key in model.method.state_dict())
    straight = {k: v.clone() for k, v in model.method.state_dict().items()}

    fit(compose_cfg, base_ckpt, algo, "first", ["trainer.max_steps=2", "trainer.val_check_interval=2"])
    _, objects = fit(
        compose_cfg, base_ckpt, algo, "resumed", [*steps, "trainer.max_epochs=-1", "ckpt_path=last"]
    )
    assert objects["trainer"].global_step == 4
    resumed = objects["model"].method.state_dict()
    assert resumed.keys() == straight.keys()
    for key, value in resumed.items():
        torch.testing.assert_close(value, straight[key], rtol=0, atol=0, msg=key)
    changed = [k for k, v in straight.items() if not k.endswith(".alpha")]
    assert changed
