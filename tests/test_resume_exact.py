"""Exact resume: a run killed mid-epoch (SIGKILL, a real subprocess) and resumed with ``ckpt_path=last``
ends with the same weights as an uninterrupted run (CPU, fp32, fixed seed); SIGTERM / SIGUSR1 write
``last.ckpt`` before exiting and it resumes."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch

from ldm.modules.vae import AutoencoderKL
from tests.conftest import compose_train
from tests.forked_cli import run_train_forked
from tests.test_finetune_lora import base_ckpt, lora_overrides  # noqa: F401 - base_ckpt is a fixture
from train import train

QUIET = ["callbacks.rich_progress_bar=null", "logger=none", "callbacks.lr_monitor=null"]
TINY_PARTS = ["model/vae=tiny", *QUIET]
# 5 batches per epoch, validation + checkpoint every 2 steps, 10 steps: the kill at step 9 comes after the
# checkpoint of step 8, the 3rd batch of the 2nd epoch (mid-epoch, after an epoch boundary).
SCHEDULE = [
    "debug=smoke",
    "trainer.max_steps=10",
    "trainer.max_epochs=-1",
    "trainer.limit_train_batches=5",
    "trainer.val_check_interval=2",
    "data.batch_size=4",
]
KILL_STEP = 9


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory) -> Path:
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)
    path = tmp_path_factory.mktemp("vae") / "vae.ckpt"
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, path)
    return path


def overrides(experiment: str, vae_ckpt: Path, base: Path | None = None) -> list[str]:
    if experiment == "lora_finetune":  # 16 concept + 4 regularisation items, latents cached in memory
        return [
            *lora_overrides(
                base,
                [
                    *QUIET,
                    *SCHEDULE,
                    "data.cache_dir=null",
                    "data.source.train_size=16",
                    "data.regularization_size=4",
                    "data.regularization.train_size=4",
                ],
            )
        ]
    common = [f"experiment={experiment}", *TINY_PARTS, *SCHEDULE, "data.val_size=4"]
    if experiment == "vae":
        return [*common, "data.train_size=24"]
    return [
        *common,
        "model/unet=tiny",
        "model/text_encoder=tiny",
        "data.train_size=24",
        f"model.vae_ckpt={vae_ckpt}",
        "model.log_prompts=[a red circle on a blue background]",
        "model/sampler=ddim",
        "model.sampler.steps=2",
    ]


def run_cli(args: list[str], log_dir: Path, signal_name: str, step: int) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in its own process (forked: no interpreter start-up) that signals itself at
    ``step``."""
    return run_train_forked(
        [
            *args,
            f"paths.log_dir={log_dir}",
            "hydra.job_logging.root.level=WARNING",
            "+callbacks.signal._target_=tests.signal_at_step.SignalAtStep",
            f"+callbacks.signal.step={step}",
            f"+callbacks.signal.signal_name={signal_name}",
        ]
    )


def final_weights(tmp_path: Path, args: list[str], name: str) -> dict[str, torch.Tensor]:
    cfg = compose_train(tmp_path, args, output_name=name)
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 10
    return {k: v.detach().clone() for k, v in objects["model"].state_dict().items()}


def max_difference(a: dict, b: dict, keys=None) -> float:
    """The largest absolute difference over ``keys`` (default: every key, which must be the same in both)."""
    if keys is None:
        assert a.keys() == b.keys()
        keys = a
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys if a[k].numel())


@pytest.fixture(scope="module")
def uninterrupted_vae(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference for every VAE interruption test: the same run, never stopped."""
    return final_weights(tmp_path_factory.mktemp("straight"), overrides("vae", Path("unused")), "straight")


@pytest.mark.parametrize("experiment", ["vae", "txt2img", "lora_finetune"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, vae_ckpt, request, experiment):
    base = request.getfixturevalue("base_ckpt") if experiment == "lora_finetune" else None
    args = overrides(experiment, vae_ckpt, base)
    killed = run_cli(args, tmp_path / "logs", "SIGKILL", KILL_STEP)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = next((tmp_path / "logs").glob("*/runs/*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 8

    resumed = final_weights(tmp_path, [*args, "ckpt_path=last"], "resumed")
    if experiment == "vae":
        uninterrupted = request.getfixturevalue("uninterrupted_vae")
    else:
        uninterrupted = final_weights(tmp_path / "straight", args, "straight")
    # bit-exact (CPU, fp32): an RNG not restored shows here
    assert max_difference(resumed, uninterrupted) == 0.0
