"""The front door: every experiment composes and survives fast_dev_run; resume continues; the CLI writes
checkpoints, image grids, the config tree and an offline wandb run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback
from omegaconf import OmegaConf

from tests.conftest import EXPERIMENTS, ROOT, add_training_callback
from tests.forked_cli import run_train_forked
from train import metric_value, train

# Overrides that keep every experiment test-sized (each experiment may add its own tiny parts).
TINY = {
    "clip": ["data.train_size=32", "data.val_size=16", "data.batch_size=8"],
    "vae": ["model/vae=tiny", "data.train_size=64", "data.val_size=8", "data.batch_size=4"],
    "txt2img": [
        "model/vae=tiny",
        "model/unet=tiny",
        "model/text_encoder=tiny",  # experiment=txt2img's default needs a CLIP run (tests/test_clip_base.py)
        "data.train_size=64",
        "data.val_size=8",
        "data.batch_size=4",
        "model.log_prompts=[a red circle on a blue background]",
        "model/sampler=ddim",
        "model.sampler.steps=2",
    ],
    "txt2img_sdxl": [
        "model/vae=tiny",
        "data.train_size=64",
        "data.val_size=8",
        "data.batch_size=4",
        "model.log_prompts=[a red circle on a blue background]",
        "model/sampler=ddim",
        "model.sampler.steps=2",
    ],
    "lora_finetune": [
        "data.source.train_size=16",
        "data.source.val_size=4",
        "data.batch_size=4",
        "model.log_prompts=[a red star on a blue background]",
        "model/sampler=ddim",
        "model.sampler.steps=2",
        "data.cache_dir=null",
    ],
    "textual_inversion_star": [
        "data.source.train_size=16",
        "data.source.val_size=4",
        "data.batch_size=4",
        "model.log_prompts=['a red <star> on a blue background']",
        "model/sampler=ddim",
        "model.sampler.steps=2",
        "data.cache_dir=null",
    ],
    "hypernetwork_star": [
        "data.source.train_size=16",
        "data.source.val_size=4",
        "data.batch_size=4",
        "model.log_prompts=[a red star on a blue background]",
        "model/sampler=ddim",
        "model.sampler.steps=2",
        "data.cache_dir=null",
    ],
}
# DreamBooth (and the named object of textual inversion / hypernetworks): 4 class images sampled in 2 steps,
# cached under the run folder
TINY["dreambooth"] = TINY["dreambooth_lora"] = TINY["hypernetwork"] = [
    "data.batch_size=4",
    "data.concepts.0.num_class_images=4",
    "data.class_images.sampler=ddim",
    "data.class_images.steps=2",
    "data.class_images.cache_dir=null",
    "data.cache_dir=null",
    "model.log_prompts=[a sks square on a red background]",
    "model/sampler=ddim",
    "model.sampler.steps=2",
]
TINY["textual_inversion"] = [
    "data.batch_size=4",
    "data.cache_dir=null",
    "model/sampler=ddim",
    "model.sampler.steps=2",
    "model.log_prompts=['a <gem> on a red background']",
]
# Presets for real bases and the user's images (model.base=??? , data.source.root=???): a tiny random base
# (fast_dev_run) and a small captioned folder stand in.
REAL_BASE_PRESETS = {
    "lora_sd15": [],
    "textual_inversion_sd15": ['model.method.placeholder="<toy>"', "model.method.initializer_word=toy"],
    "hypernetwork_sd15": [],
    "dreambooth_sd15": [
        "data.concepts.0.class_noun=dog",
        "data.concepts.0.num_class_images=2",
        "data.class_images.steps=2",
        "data.class_images.sampler=ddim",
        "data.class_images.cache_dir=null",
        "data.resolution=32",
    ],
}
REAL_BASE_PRESETS["dreambooth_lora_sd15"] = REAL_BASE_PRESETS["dreambooth_sd15"]
# SDXL presets: under fast_dev_run without a base, a tiny random SDXL base (two text encoders, sizes)
for _name in ("lora", "textual_inversion", "hypernetwork", "dreambooth", "dreambooth_lora"):
    REAL_BASE_PRESETS[f"{_name}_sdxl"] = [
        *(["data.source.resolution=32"] if not _name.startswith("dreambooth") else []),
        *REAL_BASE_PRESETS[f"{_name}_sd15"],
    ]
REAL_BASE_PRESETS["pivotal_tuning_sdxl"] = [
    "data.source.resolution=32",
    'model.method.textual_inversion.placeholder="<toy>"',
    "model.method.textual_inversion.initializer_word=toy",
]


def tiny_overrides(name: str) -> list[str]:
    if name in REAL_BASE_PRESETS:
        from tests.conftest import captioned_image_folder

        folder = captioned_image_folder()
        data = (
            [f"data.concepts.0.instance_dir={folder}"]
            if name.startswith("dreambooth")
            else [f"data.source.root={folder}", "data.source.resolution=32", "data.repeats=2"]
        )
        return [
            f"experiment={name}",
            "model.base=null",
            *data,
            *REAL_BASE_PRESETS[name],
            "model.log_prompts=[a red star]",
            "model/sampler=ddim",
            "model.sampler.steps=2",
            "data.cache_dir=null",
        ]
    return [f"experiment={name}", *TINY.get(name, ["data.batch_size=2"])]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(compose_cfg, experiment):
    cfg = compose_cfg(tiny_overrides(experiment))
    assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(compose_cfg, experiment):
    cfg = compose_cfg([*tiny_overrides(experiment), "debug=fdr"])
    metrics, objects = train(cfg)
    assert objects["trainer"].fast_dev_run
    assert any(k.startswith("train/") for k in metrics), metrics


def test_unknown_config_key_is_rejected(compose_cfg):
    with pytest.raises(Exception, match="model.no_such_key|no_such_key"):
        compose_cfg(["experiment=vae", "model.no_such_key=1"])


def test_resume_continues_at_saved_step(compose_cfg, monkeypatch):
    base = [*tiny_overrides("vae"), "debug=smoke", "callbacks.rich_progress_bar=null"]
    first = compose_cfg([*base, "trainer.max_steps=4"], output_name="first")
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4

    seen_steps = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, *args):
            seen_steps.append(trainer.global_step)

    add_training_callback(monkeypatch, Record())
    resumed = compose_cfg(
        [*base, "trainer.max_steps=6", "trainer.max_epochs=-1", "ckpt_path=last"], output_name="second"
    )
    _, objects = train(resumed)
    assert seen_steps == [4, 5]
    assert objects["trainer"].global_step == 6


def test_ckpt_path_last_without_runs_is_a_clear_error(compose_cfg):
    cfg = compose_cfg([*tiny_overrides("vae"), "debug=smoke", "ckpt_path=last"])
    with pytest.raises(FileNotFoundError, match="ckpt_path=last"):
        train(cfg)


def test_metric_value_for_sweeps():
    assert metric_value({"val/psnr": torch.tensor(30.0)}, "val/psnr") == 30.0
    assert metric_value({}, None) is None
    assert metric_value({"val/loss": 1.0}, "val/psnr") is None


def test_cli_smoke_run_writes_artifacts(tmp_path):
    """`python train.py experiment=vae debug=smoke logger=many` as a user types it: artifacts, no noise on the
    console (no warning, no Lightning tip, no FLOPs column of zeros, a step counter instead of `Epoch 0/-2`),
    and the run summary at the end."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_API_KEY", None)
    cmd = [
        sys.executable,
        "train.py",
        *tiny_overrides("vae"),
        "debug=smoke",
        "logger=many",
        f"paths.log_dir={tmp_path}",
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    for noise in (
        "Warning",
        "warn(",
        "litlogger",
        "LeafSpec",
        "anonymous",
        "FLOPs",
        "v_num",
        "Epoch 0/",
        "infer the `batch_size`",
        "eval mode",
        "Traceback",
    ):
        assert noise not in out, (noise, out[-3000:])
    run_dir = next((tmp_path / "vae" / "runs").iterdir())
    summary = out[out.index("Run summary (vae): 4 steps") :]
    assert "best val/psnr" in summary and str(run_dir / "checkpoints" / "last.ckpt") in summary
    assert str(run_dir / "images") in summary
    assert "next: python train.py experiment=txt2img model.vae_ckpt=" in summary
    assert "optimized_metric val/psnr = " in out
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    pngs = list((run_dir / "images").glob("reconstructions_*.png"))
    assert pngs, list(run_dir.rglob("*"))
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline wandb run"
    assert list((run_dir / "csv").rglob("metrics.csv"))
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_ddp_fork_hands_the_weights_back_and_summarises_the_workers_steps(tmp_path):
    """`trainer.strategy=ddp_fork` (and ddp_spawn: the same launcher): the workers train; the main process
    loads rank 0's final weights (not a training checkpoint) and its summary counts the workers' steps."""
    result = run_train_forked(
        [
            *tiny_overrides("vae"),
            "debug=smoke",
            "trainer=ddp_sim",
            "trainer.strategy=ddp_fork",
            f"paths.log_dir={tmp_path}",
            "callbacks.rich_progress_bar=null",
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "MEMBER: 2/2" in out
    last = next(tmp_path.glob("vae/runs/*/checkpoints/last.ckpt"))
    steps = torch.load(last, weights_only=True)["global_step"]
    assert steps > 0 and f"Run summary (vae): {steps} steps" in out, out[-3000:]


def test_ddp_sim_runs_two_cpu_processes(tmp_path):
    """`trainer=ddp_sim`: two CPU processes under DDP, launched from the Hydra CLI (rank 0 forked from this
    process, rank 1 a fresh interpreter Lightning starts), write one checkpoint."""
    result = run_train_forked(
        [
            *tiny_overrides("vae"),
            "debug=smoke",
            "trainer=ddp_sim",
            f"paths.log_dir={tmp_path}",
            "callbacks.rich_progress_bar=null",
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr
    assert len(list(tmp_path.glob("vae/runs/*/checkpoints/last.ckpt"))) == 1
