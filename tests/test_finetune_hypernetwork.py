"""The hypernetwork method through the fine-tuning core at test size: only the MLPs train and are
checkpointed, resume restores them, the AUTOMATIC1111 ``.pt`` export reproduces the fine-tuned UNet on a
fresh base, ``disabled()`` gives the base back, and the method's own learning rate reaches the optimiser."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.io.hypernetwork_file import load_hypernetwork
from ldm.models.base_loader import load_base_model
from ldm.models.checkpoint import load_lightning_model
from ldm.modules.adapters.hypernetwork import attach_hypernetwork
from tests.test_hypernetwork import tiny_lightning_checkpoint
from train import train

PARTS = [
    "model/sampler=ddim",
    "model.sampler.steps=2",
    "callbacks.rich_progress_bar=null",
    "debug=smoke",
    "data.source.train_size=16",
    "data.source.val_size=4",
    "data.batch_size=4",
    "data.cache_dir=null",
    "data.source.resolution=16",
    "model.log_prompts=[a red star on a blue background]",
]


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """A tiny random txt2img checkpoint (16 px, 64-wide context): enough to run the method end to end."""
    return tiny_lightning_checkpoint(tmp_path_factory.mktemp("hn_base") / "last.ckpt")


def overrides(base: Path, *extra: str) -> list[str]:
    return ["experiment=hypernetwork_star", *PARTS, f"model.base={base}", *extra]


def test_hypernetwork_trains_only_its_mlps_and_exports_automatic1111(compose_cfg, base_ckpt):
    cfg = compose_cfg(overrides(base_ckpt))
    _, objects = train(cfg)
    model, run = objects["model"], Path(cfg.paths.output_dir)

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("hypernetwork.layers.64.") for n in trainable)
    assert model.method.attached and all(n.endswith("attn2") for n in model.method.attached)
    optimizer = objects["trainer"].optimizers[0]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [cfg.model.method.lr]

    # checkpoints hold the MLPs (+ the scale factor) and nothing of the base
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == {f"method.{k}" for k in model.method.state_dict()} | {"scale_factor"}
    assert all(
        k.startswith("method.hypernetwork.layers.64.") for k in ckpt["state_dict"] if k != "scale_factor"
    )

    # the exported AUTOMATIC1111 file (weights-only) on a fresh base reproduces the fine-tuned UNet
    exported = run / "adapters" / "hypernetwork_star.pt"
    payload = torch.load(exported, weights_only=True)
    assert payload["step"] == objects["trainer"].global_step and payload["activation_func"] == "relu"
    net, _ = load_hypernetwork(exported)
    fresh = load_base_model(str(base_ckpt)).unet.eval()
    attach_hypernetwork(fresh, net)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 20, 64)
    with torch.no_grad():
        tuned = model.unet(x, t, ctx)
        torch.testing.assert_close(fresh(x, t, ctx), tuned)
        with model.method.disabled():
            base_out = model.unet(x, t, ctx)
        assert not torch.allclose(base_out, tuned)
        assert model.hypernetwork.strength == 1.0  # restored after disabled()
    images = run / "images"
    assert list(images.glob("samples_*.png")) and list(images.glob("base_samples_*.png"))

    # sample.py --ckpt <this run's checkpoint>: the base + the MLPs are rebuilt
    rebuilt = load_lightning_model(run / "checkpoints" / "last.ckpt")
    for key, value in rebuilt.method.state_dict().items():
        torch.testing.assert_close(value, ckpt["state_dict"][f"method.{key}"], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.unet(x, t, ctx), tuned)


def test_hypernetwork_resume_restores_the_mlps(compose_cfg, base_ckpt):
    first = compose_cfg(
        overrides(base_ckpt, "trainer.max_steps=2", "trainer.val_check_interval=2"), output_name="a"
    )
    train(first)
    saved = torch.load(Path(first.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    same = compose_cfg(overrides(base_ckpt, "trainer.max_steps=2", "ckpt_path=last"), output_name="b")
    _, objects = train(same)
    state = objects["model"].method.state_dict()
    assert objects["trainer"].global_step == 2 and state
    for key, value in state.items():
        torch.testing.assert_close(value, saved["state_dict"][f"method.{key}"], rtol=0, atol=0)
