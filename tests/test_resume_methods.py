"""Exact resume of the newer fine-tuning methods: textual inversion (placeholder templates drawn per item),
a hypernetwork with dropout, DreamBooth (full UNet and LoRA, with generated class images and prior
preservation). A run killed mid-epoch (SIGKILL, a real subprocess) and resumed with ``ckpt_path=last`` ends
with the same trained tensors and global step as the uninterrupted run (CPU, fp32, fixed seed)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_train
from tests.test_finetune_lora import FINETUNE_PARTS, base_ckpt  # noqa: F401 - base_ckpt is a fixture
from tests.test_resume_exact import KILL_STEP, QUIET, SCHEDULE, max_difference, run_cli
from train import train


def method_overrides(experiment: str, base: Path, class_dir: Path) -> list[str]:
    common = [
        f"experiment={experiment}",
        *FINETUNE_PARTS,
        *QUIET,
        *SCHEDULE,
        f"model.base={base}",
        "data.cache_dir=null",
        "model.ema_decay=0.9",
    ]
    if experiment in ("dreambooth", "dreambooth_lora"):  # 3 instance images x 8 + 24 class images: 12 batches
        return [
            *common,
            "data.val_size=2",
            "data.concepts.0.num_instance_images=3",
            "data.concepts.0.num_class_images=24",
            "data.class_images.sampler=ddim",
            "data.class_images.steps=2",
            "data.class_images.batch_size=8",
            f"data.class_images.cache_dir={class_dir}",
            "model.log_prompts=[a sks square on a red background]",
        ]
    shapes = [*common, "data.source.train_size=24", "data.source.val_size=4"]
    if experiment == "textual_inversion_star":  # a random template per item and epoch
        return [*shapes, "data.caption_transform.mode=object", "model.log_prompts=['a <star>']"]
    # other dropout masks would move the MLPs > 1e-6
    return [
        *shapes,
        "model.method.dropout_structure=[0,0.3,0]",  # dropout after the hidden layer: draws every step
        "model.method.activation=relu",
        "model.log_prompts=[a red star on a blue background]",
        "model.method.lr=1e-2",
        "model.scheduler.warmup_steps=0",
    ]


def trained_state(tmp_path: Path, args: list[str], name: str) -> tuple[dict[str, torch.Tensor], int]:
    cfg = compose_train(tmp_path, args, output_name=name)
    _, objects = train(cfg)
    model = objects["model"]
    state = {f"model.{k}": v for k, v in model.state_dict().items()}  # everything, frozen parts included
    state.update({f"method.{k}": v for k, v in model.method.state_dict().items()})  # what the method trains
    if getattr(model, "method_ema", None) is not None:
        state.update({f"method_ema.{k}": v for k, v in model.method_ema.state_dict().items()})
    return {k: v.detach().clone() for k, v in state.items()}, objects["trainer"].global_step


# the *_star experiments: template captions and dropout (the named-object demos use DreamBooth's data)
@pytest.mark.parametrize(
    "experiment", ["textual_inversion_star", "hypernetwork_star", "dreambooth", "dreambooth_lora"]
)
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, base_ckpt, experiment):  # noqa: F811
    args = method_overrides(experiment, base_ckpt, tmp_path / "class_images")
    killed = run_cli(args, tmp_path / "logs", "SIGKILL", KILL_STEP)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = next((tmp_path / "logs").glob("*/runs/*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 8

    resumed, resumed_step = trained_state(tmp_path, [*args, "ckpt_path=last"], "resumed")
    # the uninterrupted run generates its own class images (same base and seed: the same images)
    straight_args = method_overrides(experiment, base_ckpt, tmp_path / "straight_class_images")
    uninterrupted, step = trained_state(tmp_path / "straight", straight_args, "straight")
    assert resumed_step == step == 10
    assert any(k.startswith("method.") for k in uninterrupted) and any(
        k.startswith("method_ema.") for k in uninterrupted
    )
    # bit-exact (CPU, fp32): an RNG not restored shows here
    assert max_difference(resumed, uninterrupted) == 0.0
