"""What a new user meets first: errors that say what to do, every trainer config, a quiet console, the run
summary, sample.py's command line (issue 15)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import hydra
import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig

from tests.conftest import CONF, EXPERIMENTS, ROOT
from tests.readme_commands import env

TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
TINY_VAE = ["experiment=vae", "model/vae=tiny", "data.train_size=16", "data.val_size=4", "data.batch_size=4"]


# -- trainer configs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_config_composes_and_builds_its_strategy(compose_cfg, name):
    cfg = compose_cfg([*TINY_VAE, f"trainer={name}"])
    strategy = cfg.trainer.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        built = hydra.utils.instantiate(strategy)  # e.g. FSDPStrategy(sharding_strategy=FULL_SHARD)
        assert type(built).__name__ == strategy._target_.rsplit(".", 1)[-1]
    else:
        assert strategy == "auto" or strategy in StrategyRegistry, strategy
    if cfg.trainer.accelerator in ("cpu", "auto"):
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
        assert trainer.num_devices == cfg.trainer.devices


@pytest.mark.parametrize("name", ["gpu", "ddp", "fsdp", "deepspeed"])
def test_gpu_trainer_without_a_gpu_says_what_to_use(compose_cfg, monkeypatch, name):
    from lightning.pytorch.accelerators import CUDAAccelerator

    from ldm.utils.task import is_user_error, one_line

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg([*TINY_VAE, f"trainer={name}"])
    with pytest.raises(Exception) as info:
        hydra.utils.instantiate(cfg.trainer, logger=False)
    if (
        name == "deepspeed"
        and "deepspeed" in str(info.value).lower()
        and "gpu" not in str(info.value).lower()
    ):
        assert is_user_error(info.value)  # "pip install deepspeed" comes first where it is missing
        return
    assert is_user_error(info.value)
    line = one_line(info.value)
    assert "trainer=cpu" in line and "trainer=ddp_sim" in line and "\n" not in line


# -- user errors: one line, not a traceback ----------------------------------------------------------------
def test_user_error_is_one_actionable_line_from_the_cli(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "experiment=vae",
        "data=image_folder",
        f"data.root={tmp_path / 'nope'}",
        "debug=smoke",
        f"paths.log_dir={tmp_path}",
    ]
    result = subprocess.run(
        cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, check=False
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if "error: image folder" in line]
    assert len(errors) == 1 and "does not exist" in errors[0] and "data.root" in errors[0], out[-3000:]


def test_run_task_logs_one_line_and_full_trace_on_request(monkeypatch, caplog):
    from ldm.utils.task import run_task

    def bad():
        raise FileNotFoundError("ckpt_path=x.ckpt does not exist")

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        run_task(bad)
    assert exit_info.value.code == 1
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "error: ckpt_path=x.ckpt does not exist (HYDRA_FULL_ERROR=1 for the full trace)"
    ]
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(FileNotFoundError):
        run_task(bad)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_task(lambda: 1 / 0)


def test_vae_of_another_architecture_names_the_preset_to_pass(compose_cfg, tmp_path):
    """Finding 4: a f=8 VAE run, then txt2img configured for f=4 -> 'pass model/vae=f8'."""
    from ldm.modules.vae import AutoencoderKL

    run = tmp_path / "vae" / "runs" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      model/vae: f8\n")
    f8 = AutoencoderKL(
        embed_dim=4, ch=8, ch_mult=(1, 2, 2, 4), num_res_blocks=1, resolution=32, norm_groups=4
    )
    torch.save(
        {"state_dict": {f"vae.{k}": v for k, v in f8.state_dict().items()}}, run / "checkpoints" / "last.ckpt"
    )
    cfg = compose_cfg(
        [
            "experiment=txt2img",
            "model/vae=tiny",
            "model/unet=tiny",
            "model/text_encoder=tiny",
            f"model.vae_ckpt={run / 'checkpoints' / 'last.ckpt'}",
        ]
    )
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    with pytest.raises(ValueError) as info:
        model.setup("fit")
    message = str(info.value)
    assert "is f=8, c=4" in message and "model/vae is f=4" in message
    assert "pass model/vae=f8" in message and "model.vae_ckpt=" in message


def test_fine_tune_folder_errors_name_data_source_root(compose_cfg, tmp_path):
    from ldm.utils.task import one_line

    cfg = compose_cfg(
        ["experiment=lora_finetune", "data=finetune_folder", f"data.source.root={tmp_path / 'no'}"]
    )
    with pytest.raises(Exception) as info:
        hydra.utils.instantiate(cfg.data, _convert_="all")
    line = one_line(info.value)
    assert "does not exist" in line and "(data.source.root)" in line and "(data.root)" not in line


# -- config keys as users type them -------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_trainer_fast_dev_run_is_a_key(compose_cfg, experiment):
    cfg = compose_cfg([f"experiment={experiment}", "trainer.fast_dev_run=true"])
    assert cfg.trainer.fast_dev_run is True


def test_vae_on_an_image_folder(compose_cfg, tmp_path):
    """Finding 1: experiment=vae data=image_folder (the experiment sets no shapes-only keys)."""
    from PIL import Image

    from train import train

    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 90, 200 - 30 * i)).save(tmp_path / f"{i}.png")
    cfg = compose_cfg(
        [
            "experiment=vae",
            "model/vae=tiny",
            "data=image_folder",
            f"data.root={tmp_path}",
            "data.resolution=32",
            "data.num_workers=0",
            "data.val_size=2",
            "trainer.fast_dev_run=true",
            "logger=none",
            "callbacks.rich_progress_bar=null",
        ]
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].fast_dev_run and "train/loss" in metrics


def test_vae_run_never_reads_the_captions_it_does_not_use(compose_cfg, tmp_path):
    """A non-UTF-8 caption file stops a text-to-image run (one clear error) but not a VAE run, whose model
    reads no text (issue 27)."""
    from PIL import Image

    from datamodules.image_folder import ImageFolderDataModule
    from train import train

    for i in range(6):
        Image.new("RGB", (40, 40), (40 * i, 90, 200 - 30 * i)).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_bytes(b"caf\xe9 au lait")  # cp1252, not UTF-8
    data = ImageFolderDataModule(root=str(tmp_path), resolution=32, num_workers=0, val_size=2)
    with pytest.raises(ValueError, match=r"0.txt is not UTF-8"):
        data.setup("fit")
    cfg = compose_cfg(
        [
            "experiment=vae",
            "model/vae=tiny",
            "data=image_folder",
            f"data.root={tmp_path}",
            "data.resolution=32",
            "data.num_workers=0",
            "data.val_size=2",
            "trainer.fast_dev_run=true",
            "logger=none",
            "callbacks.rich_progress_bar=null",
        ]
    )
    metrics, objects = train(cfg)
    assert "train/loss" in metrics and objects["datamodule"].read_captions is False


def test_logger_none_leaves_out_the_lr_monitor():
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from ldm.utils.instantiate import drop_callbacks_needing_a_logger

    callbacks = [LearningRateMonitor(), ModelCheckpoint()]
    assert [type(c) for c in drop_callbacks_needing_a_logger(callbacks, [])] == [ModelCheckpoint]
    assert drop_callbacks_needing_a_logger(callbacks, [object()]) == callbacks


# -- console -------------------------------------------------------------------------------------------------
def fake_trainer(**kw):
    base = {
        "max_steps": 3000,
        "max_epochs": -1,
        "fast_dev_run": False,
        "global_step": 1200,
        "current_epoch": 5,
        "progress_bar_metrics": {"train/loss": 0.5},
        "loggers": [SimpleNamespace(version=7)],
        "num_training_batches": 125,
        "interrupted": False,
        "callbacks": [],
    }
    return SimpleNamespace(**{**base, **kw})


def test_progress_bar_counts_steps_and_drops_v_num():
    from callbacks.progress import StepProgressBar

    bar = StepProgressBar()
    bar._trainer = fake_trainer()
    assert bar._get_train_description(5).strip() == "Training" and bar.total_train_batches == 3000
    bar._trainer = fake_trainer(max_steps=-1, max_epochs=-1)
    assert bar._get_train_description(5).strip() == "Epoch 5"  # never "Epoch 5/-2"
    bar._trainer = fake_trainer(max_steps=-1, max_epochs=10)
    assert bar._get_train_description(5).strip() == "Epoch 5/9"
    assert "v_num" not in bar.get_metrics(fake_trainer(), None)


def test_model_summary_has_no_unmeasured_flops_and_checks_train_mode(capsys, caplog):
    from callbacks.model_summary import ModelSummary

    data = [
        (" ", ["0"]),
        ("Name", ["unet"]),
        ("Type", ["UNet"]),
        ("Params", ["1 M"]),
        ("Mode", ["train"]),
        ("FLOPs", ["0"]),
    ]
    ModelSummary.summarize(data, 100, 60, 0.4, {"train": 1, "eval": 0}, 0)
    out = capsys.readouterr().out
    assert "FLOPs" not in out and "Frozen params" in out and "unet" in out

    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False))
    module[1].eval()  # frozen + eval: fine
    with caplog.at_level(logging.WARNING):
        ModelSummary().on_train_start(None, module)
    assert not caplog.records
    module[0].eval()  # trainable + eval: reported
    with caplog.at_level(logging.WARNING):
        ModelSummary().on_train_start(None, module)
    assert "'0'" in caplog.text and "eval mode" in caplog.text


def test_best_line_says_when_the_best_came_from_the_resumed_run(tmp_path):
    from ldm.utils.run_summary import best_line

    run = tmp_path / "b"
    ckpt = SimpleNamespace(
        monitor="val/psnr",
        best_model_score=torch.tensor(30.0),
        best_model_path=str(tmp_path / "a" / "checkpoints" / "step_4.ckpt"),
    )
    assert "written by the run this one resumed from" in best_line(
        SimpleNamespace(checkpoint_callback=ckpt), run
    )
    ckpt.best_model_path = str(run / "checkpoints" / "step_6.ckpt")
    line = best_line(SimpleNamespace(checkpoint_callback=ckpt), run)
    assert line == f"best val/psnr 30 ({ckpt.best_model_path})"


# -- sample.py -----------------------------------------------------------------------------------------------
def test_sample_refuses_to_overwrite_an_earlier_grid(tmp_path):
    import sample

    (tmp_path / "grid.png").write_bytes(b"earlier")
    with pytest.raises(SystemExit, match="--overwrite"):
        sample.main(["--ckpt", "last", "--prompt", "x", "--out", str(tmp_path), "--log-dir", str(tmp_path)])
    assert (tmp_path / "grid.png").read_bytes() == b"earlier"
    assert "samples/" in (ROOT / ".gitignore").read_text().split()


def test_sample_cli_ckpt_last_and_lora_multiplier(embedded_chain, tmp_path, monkeypatch):
    """--ckpt last finds the newest txt2img run; --lora file:0.8 merges the LoRA at 0.8 (0 = the base)."""
    import sample
    from ldm.models import pipeline

    logs = embedded_chain / "logs"
    lora = next(logs.glob("lora_finetune/runs/*/adapters/lora_finetune.safetensors"))
    common = ["--ckpt", "last", "--log-dir", str(logs), "--device", "cpu"]
    base = pipeline.load_for_sampling("last", log_dir=str(logs))
    zero = pipeline.load_for_sampling("last", log_dir=str(logs), loras=[f"{lora}:0"])
    scaled = pipeline.load_for_sampling("last", log_dir=str(logs), loras=[f"{lora}:0.8"])
    full = pipeline.load_for_sampling("last", log_dir=str(logs), loras=[str(lora)])
    w = lambda m: torch.cat([p.flatten() for p in m.unet_ema.module.parameters()])
    torch.testing.assert_close(w(zero), w(base))
    torch.testing.assert_close(w(scaled) - w(base), 0.8 * (w(full) - w(base)), atol=1e-6, rtol=1e-4)
    grid = sample.main(
        [
            *common,
            "--lora",
            f"{lora}:0.8",
            "--prompt",
            "a red star",
            "--n",
            "2",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    assert grid.is_file() and len(list((tmp_path / "s").glob("0*_a_red_star.png"))) == 2
    assert os.environ.get("WANDB_MODE") == "offline"


def test_next_command_after_each_kind_of_run(tmp_path):
    from omegaconf import OmegaConf

    from ldm.utils.run_summary import next_command

    last = tmp_path / "checkpoints" / "last.ckpt"
    cfg = OmegaConf.create({"model": {"base": None, "log_prompts": ["a red star"]}})
    vae = SimpleNamespace(vae=object())
    assert (
        next_command(vae, cfg, last, tmp_path) == f"python train.py experiment=txt2img model.vae_ckpt={last}"
    )
    clip = SimpleNamespace(clip=object(), hparams=SimpleNamespace(export_dir=str(tmp_path / "clip")))
    assert next_command(clip, cfg, last, tmp_path) == (
        f"python train.py experiment=txt2img model.conditioner.embedders.0.module.path={tmp_path / 'clip'}"
    )
    txt2img = SimpleNamespace(vae=object(), unet=object(), generate=lambda: None)
    assert (
        next_command(txt2img, cfg, last, tmp_path) == f'python sample.py --ckpt {last} --prompt "a red star"'
    )
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "lora_sd15.safetensors").write_bytes(b"")
    cfg.model.base = "/models/sd15.safetensors"
    assert next_command(txt2img, cfg, last, tmp_path) == (
        "python sample.py --ckpt /models/sd15.safetensors --lora "
        f"{tmp_path / 'adapters' / 'lora_sd15.safetensors'}"
        ' --prompt "a red star"'
    )
    # intermediate exports sort before the final one by name; next: names the final one (issue 27)
    for step in (100, 200):
        (tmp_path / "adapters" / f"lora_sd15-step{step:06d}.safetensors").write_bytes(b"")
    assert f"--lora {tmp_path / 'adapters' / 'lora_sd15.safetensors'} " in next_command(
        txt2img, cfg, last, tmp_path
    )
    (
        tmp_path / "adapters" / "lora_sd15.safetensors"
    ).unlink()  # a run stopped before its end: the newest step
    assert "lora_sd15-step000200.safetensors" in next_command(txt2img, cfg, last, tmp_path)
