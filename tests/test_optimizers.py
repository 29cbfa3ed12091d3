"""The optimisers people pick beside AdamW: Prodigy, schedule-free AdamW and Lion (``model/optimizer=...``).
Each builds from its config and trains a LoRA; schedule-free's train/eval modes follow the model (validation,
checkpoints and the weights left after training are the averaged ones); each resumes exactly; a missing
package is one error naming the pip command."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from ldm.utils.optional import MissingOptionalPackage
from ldm.utils.task import is_user_error
from tests.conftest import compose_train
from tests.test_finetune_lora import base_ckpt, lora_overrides  # noqa: F401 - base_ckpt is a fixture
from tests.test_resume_exact import KILL_STEP, max_difference, overrides, run_cli
from train import train

OPTIMIZERS = {
    "prodigy": ("prodigyopt", "Prodigy"),
    "schedulefree_adamw": ("schedulefree", "AdamWScheduleFree"),
    "lion": ("lion_pytorch", "Lion"),
}


class RecordModes(L.Callback):
    """The schedule-free optimiser's mode at each validation batch and after each training step."""

    def __init__(self):
        self.validation, self.training = [], []

    @staticmethod
    def mode(trainer) -> bool:
        return trainer.optimizers[0].param_groups[0]["train_mode"]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if trainer.optimizers:
            self.validation.append(self.mode(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.training.append(self.mode(trainer))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_builds_with_its_defaults_and_trains_the_lora(compose_cfg, base_ckpt, name):  # noqa: F811
    cfg = compose_cfg(
        lora_overrides(
            base_ckpt,
            [
                "data.cache_dir=null",
                f"model/optimizer={name}",
                "callbacks.image_logger=null",
                *(["model.optimizer.lr=1.0"] if name == "prodigy" else []),
            ],
        )
    )
    module, cls = OPTIMIZERS[name]
    _, objects = train(cfg)
    optimizer, model = objects["trainer"].optimizers[0], objects["model"]
    assert type(optimizer).__name__ == cls and type(optimizer).__module__.startswith(module)
    group = optimizer.param_groups[0]
    if name == "prodigy":
        assert (
            group.get("initial_lr", group["lr"]) == 1.0
            and group["safeguard_warmup"]
            and group["use_bias_correction"]
        )
        assert group["d_coef"] == 1.0 and group["d"] > 0 and group["k"] > 0  # it stepped, estimating d
    if name == "lion":
        assert tuple(group["betas"]) == (0.9, 0.99)
    assert isinstance(group["betas"], tuple)  # plain data in checkpoints (weights_only loads)
    lora_up = [p for n, p in model.unet.named_parameters() if "lora_up" in n]
    assert lora_up and any(float(p.abs().max()) > 0 for p in lora_up)  # zero-initialised: it trained


def test_schedulefree_modes_follow_the_model(compose_cfg, base_ckpt):  # noqa: F811
    cfg = compose_cfg(
        lora_overrides(
            base_ckpt,
            [
                "data.cache_dir=null",
                "model/optimizer=schedulefree_adamw",
                "model.optimizer.lr=1e-2",
                "model.scheduler=null",
                "callbacks.image_logger=null",
                "+callbacks.modes._target_=tests.test_optimizers.RecordModes",
            ],
        )
    )
    _, objects = train(cfg)
    trainer, model = objects["trainer"], objects["model"]
    recorder = next(c for c in trainer.callbacks if isinstance(c, RecordModes))
    assert recorder.validation and not any(recorder.validation)  # validation ran on x
    assert recorder.training and all(recorder.training)  # every step ran on y
    # after training the parameters in memory are x (export and sampling use them): they differ from y
    optimizer = trainer.optimizers[0]
    assert not optimizer.param_groups[0]["train_mode"]
    params = model.method.parameters()
    x = [p.detach().clone() for p in params]
    optimizer.train()
    assert max(float((p - q).abs().max()) for p, q in zip(params, x)) > 0


class _Host(torch.nn.Module):
    """What ``save_in_eval_mode`` needs of a LightningModule: parameters and a trainer's optimisers."""

    def __init__(self, optimizer_factory):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self._trainer = type("T", (), {"optimizers": [optimizer_factory(self.parameters())]})()


def test_a_checkpoint_saved_between_steps_holds_the_averaged_weights():
    from ldm.models.optimizer_modes import save_in_eval_mode
    from ldm.models.optimizers import schedulefree_adamw

    torch.manual_seed(0)
    host = _Host(lambda params: schedulefree_adamw(params, lr=0.1))
    optimizer = host._trainer.optimizers[0]
    optimizer.train()
    for _ in range(3):
        optimizer.zero_grad()
        host.layer(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
    y = {k: v.detach().clone() for k, v in host.state_dict().items()}
    checkpoint = {"state_dict": dict(host.state_dict()), "optimizer_states": [optimizer.state_dict()]}
    save_in_eval_mode(host, checkpoint)
    optimizer.train()  # back to y, as the next training step does
    reference = _Host(lambda params: schedulefree_adamw(params, lr=0.1))
    reference.load_state_dict(y)
    ref_optimizer = reference._trainer.optimizers[0]
    ref_optimizer.load_state_dict({**optimizer.state_dict()})
    ref_optimizer.param_groups[0]["train_mode"] = True
    ref_optimizer.eval()  # y -> x
    assert max_difference(checkpoint["state_dict"], reference.state_dict()) == 0.0
    assert max_difference(checkpoint["state_dict"], y) > 0  # not the training weights y
    assert not checkpoint["optimizer_states"][0]["param_groups"][0]["train_mode"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, base_ckpt, name):  # noqa: F811
    args = [
        *overrides("lora_finetune", Path("unused"), base_ckpt),
        f"model/optimizer={name}",
        *(["model.optimizer.lr=1.0"] if name == "prodigy" else []),
    ]
    killed = run_cli(args, tmp_path / "logs", "SIGKILL", KILL_STEP)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = trained(tmp_path, [*args, "ckpt_path=last"], "resumed")
    uninterrupted = trained(tmp_path / "straight", args, "straight")
    assert resumed.pop("step") == uninterrupted.pop("step") == 10
    assert any("lora" in k for k in resumed) and any(k.startswith("optimizer.") for k in resumed)
    assert max_difference(resumed, uninterrupted) == 0.0  # weights and optimiser state, bit-exact


def trained(tmp_path: Path, args: list[str], name: str) -> dict:
    """The final weights and every optimiser state tensor (and number) of a run, and its global step."""
    _, objects = train(compose_train(tmp_path, args, output_name=name))
    optimizer = objects["trainer"].optimizers[0]
    state = {f"model.{k}": v.detach().clone() for k, v in objects["model"].state_dict().items()}
    for index, per_param in optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            state[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().clone()
    for index, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                state[f"optimizer.group{index}.{key}"] = torch.tensor(float(value))
    state["step"] = objects["trainer"].global_step
    return state


def test_a_missing_optimizer_package_is_one_error_naming_pip(compose_cfg, base_ckpt, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import prodigyopt -> ImportError
    cfg = compose_cfg(lora_overrides(base_ckpt, ["data.cache_dir=null", "model/optimizer=prodigy"]))
    with pytest.raises(MissingOptionalPackage, match="pip install prodigyopt") as caught:
        train(cfg)
    assert is_user_error(caught.value)
