"""`trainer=ddp_sim` (2 CPU processes, per-process batch B/2) reproduces one process with batch B: the same
weights after a few steps for txt2img and for a LoRA fine-tune, the EMA identical on every rank, and the
latent cache encoded once (rank zero writes it, the other rank reads it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from ldm.modules.vae import AutoencoderKL
from tests.conftest import ROOT
from train import train

STEPS = 3
COMMON = ["debug=smoke", f"trainer.max_steps={STEPS}", "callbacks.image_logger=null",
          "callbacks.rich_progress_bar=null", "callbacks.lr_monitor=null", "seed=7"]
TXT2IMG = ["experiment=txt2img", "model/vae=tiny", "model/unet=tiny", "data.train_size=16", "data.val_size=4",
           "model.log_prompts=[a red circle on a blue background]"]
LORA = ["experiment=lora_finetune", "data.source.train_size=16", "data.source.val_size=4",
        "model.log_prompts=[a red star on a blue background]", "data.regularization_size=0"]
TOLERANCE = 1e-6  # measured 4e-9 to 8e-9: float32 sums of the gradient all-reduce come in another order


def dump(path: Path) -> list[str]:
    return ["+callbacks.dump._target_=tests.ddp_state.DumpState", f"+callbacks.dump.path={path}"]


def run_ddp(overrides: list[str], log_dir: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", *overrides, "trainer=ddp_sim", "data.batch_size=2",
           f"paths.log_dir={log_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr


def max_difference(a: dict, b: dict, keys) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in keys)


def test_ddp_two_processes_match_one_process_with_the_whole_batch(compose_cfg, tmp_path):
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, tmp_path / "vae.ckpt")
    txt2img = [*TXT2IMG, *COMMON, f"model.vae_ckpt={tmp_path / 'vae.ckpt'}"]

    # txt2img: the UNet, its EMA and the estimated scale factor
    single = compose_cfg([*txt2img, "data.batch_size=4", *dump(tmp_path / "one")], output_name="one")
    train(single)
    run_ddp([*txt2img, *dump(tmp_path / "two")], tmp_path / "ddp")
    one, rank0, rank1 = (torch.load(tmp_path / p, weights_only=True)
                         for p in ("one/rank0.pt", "two/rank0.pt", "two/rank1.pt"))
    unet_keys = [k for k in one if k.startswith("unet.")]
    ema_keys = [k for k in one if k.startswith("unet_ema.module.")]
    assert unet_keys and ema_keys
    assert max_difference(one, rank0, unet_keys + ema_keys + ["scale_factor"]) <= TOLERANCE
    assert all(torch.equal(rank0[k], rank1[k]) for k in ema_keys)  # the EMA is identical on every rank
    assert float(one["unet.out.2.weight"].abs().max()) > 0  # trained: the zero-initialised output layer moved

    # LoRA fine-tune of that txt2img model, with a disk latent cache written once
    base = Path(single.paths.output_dir) / "checkpoints" / "last.ckpt"
    lora = [*LORA, *COMMON, f"model.base={base}", f"data.cache_dir={tmp_path / 'cache'}"]
    single = compose_cfg([*lora, "data.batch_size=4", *dump(tmp_path / "lora_one")], output_name="lora_one")
    train(single)
    caches = sorted((tmp_path / "cache").glob("latents_*.pt"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns
    run_ddp([*lora, *dump(tmp_path / "lora_two")], tmp_path / "ddp")
    assert caches[0].stat().st_mtime_ns == stamp  # same data, same VAE: read, not re-encoded
    one, rank0, rank1 = (torch.load(tmp_path / p, weights_only=True)
                         for p in ("lora_one/rank0.pt", "lora_two/rank0.pt", "lora_two/rank1.pt"))
    lora_keys = [k for k in one if "lora_" in k]
    assert lora_keys
    assert max_difference(one, rank0, lora_keys) <= TOLERANCE
    assert max_difference(rank0, rank1, lora_keys) == 0.0


def test_ddp_sigkill_then_resume_equals_the_uninterrupted_ddp_run(tmp_path):
    """Both ranks killed at once mid-epoch after a checkpoint, then `ckpt_path=last` under the same
    trainer=ddp_sim: the weights (and EMA) of every rank equal the uninterrupted DDP run's."""
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, tmp_path / "vae.ckpt")
    # 24 items, 2 ranks x 2 per batch: 6 batches per epoch (5 used), a checkpoint every 2 steps, killed at 9
    common = [o for o in COMMON if not o.startswith("trainer.max_steps")]
    args = [*[o for o in TXT2IMG if not o.startswith("data.train_size")], *common, "data.train_size=24",
            f"model.vae_ckpt={tmp_path / 'vae.ckpt'}", "trainer.max_steps=10", "trainer.max_epochs=-1",
            "trainer.limit_train_batches=5", "trainer.val_check_interval=2"]
    kill = ["+callbacks.signal._target_=tests.signal_at_step.SignalAtStep", "+callbacks.signal.step=9",
            "+callbacks.signal.group=true"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", *args, *kill, "trainer=ddp_sim", "data.batch_size=2",
           f"paths.log_dir={tmp_path / 'ddp'}"]
    killed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
                            start_new_session=True)  # its own process group: the kill takes both ranks, not us
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = next((tmp_path / "ddp").glob("*/runs/*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 8

    run_ddp([*args, "ckpt_path=last", *dump(tmp_path / "resumed")], tmp_path / "ddp")
    run_ddp([*args, *dump(tmp_path / "straight")], tmp_path / "straight")
    for rank in (0, 1):
        resumed, straight = (torch.load(tmp_path / p / f"rank{rank}.pt", weights_only=True)
                             for p in ("resumed", "straight"))
        keys = [k for k in straight if k.startswith(("unet.", "unet_ema.module."))]
        assert max_difference(resumed, straight, keys) <= TOLERANCE
