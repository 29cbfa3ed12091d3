"""`trainer=ddp_sim` (2 CPU processes, per-process batch B/2; ranks forked) reproduces one process with batch
B: the same weights after a few steps for txt2img and for a LoRA fine-tune, the EMA identical on every rank,
the latent cache encoded once (rank zero writes it, the other rank reads it), and an exact resume after both
ranks are killed."""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from ldm.modules.vae import AutoencoderKL
from tests.forked_cli import run_train_forked
from tests.test_finetune_lora import base_ckpt  # noqa: F401 - a fixture
from tests.test_resume_exact import max_difference
from tests.test_resume_methods import method_overrides
from train import train

# 24 items, 2 ranks x 2 per batch (one process: 4): 6 batches per epoch (5 used), validation and a checkpoint
# every 2 steps, 10 steps (the kill at step 9 comes mid-epoch, after the step-8 checkpoint)
SCHEDULE = [
    "debug=smoke",
    "trainer.max_steps=10",
    "trainer.max_epochs=-1",
    "trainer.limit_train_batches=5",
    "trainer.val_check_interval=2",
]
COMMON = [
    "callbacks.image_logger=null",
    "callbacks.rich_progress_bar=null",
    "callbacks.lr_monitor=null",
    "seed=7",
]
TXT2IMG = [
    "experiment=txt2img",
    "model/vae=tiny",
    "model/unet=tiny",
    "model/text_encoder=tiny",
    "data.train_size=24",
    "data.val_size=4",
    "model.log_prompts=[a red circle on a blue background]",
]
LORA = [
    "experiment=lora_finetune",
    "data.source.train_size=16",
    "data.source.val_size=4",
    "model.log_prompts=[a red star on a blue background]",
    "data.regularization_size=0",
    "debug=smoke",
    "trainer.max_steps=3",
]
TOLERANCE = 1e-6  # measured 4e-9 to 8e-9: float32 sums of the gradient all-reduce come in another order


def dump(path: Path) -> list[str]:
    return ["+callbacks.dump._target_=tests.ddp_state.DumpState", f"+callbacks.dump.path={path}"]


def run_ddp(overrides: list[str], log_dir: Path, expect_signal: int | None = None) -> None:
    """``python train.py <overrides> trainer=ddp_sim trainer.strategy=ddp_fork`` in a fork of this process,
    whose two ranks Lightning forks in turn: the same DDP (gloo, DistributedSampler, all-reduce) as the
    ``ddp`` launcher without two interpreter start-ups (that one runs in test_train.py)."""
    result = run_train_forked(
        [
            *overrides,
            "trainer=ddp_sim",
            "trainer.strategy=ddp_fork",
            "data.batch_size=2",
            f"paths.log_dir={log_dir}",
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    expected = 0 if expect_signal is None else -expect_signal
    assert result.returncode == expected, (result.stdout + result.stderr)[-3000:]
    assert "MEMBER: 2/2" in result.stdout + result.stderr


def test_ddp_two_processes_match_one_process_and_resume_exactly(compose_cfg, tmp_path):
    """txt2img: one process with batch 4 == trainer=ddp_sim with 2 x 2 (UNet, EMA identical on every rank,
    scale factor); both ranks SIGKILLed mid-epoch after a checkpoint, then ``ckpt_path=last`` under the same
    trainer=ddp_sim: the weights (and EMA) of every rank equal the uninterrupted DDP run's."""
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, tmp_path / "vae.ckpt")
    args = [*TXT2IMG, *COMMON, *SCHEDULE, f"model.vae_ckpt={tmp_path / 'vae.ckpt'}"]

    single = compose_cfg([*args, "data.batch_size=4", *dump(tmp_path / "one")], output_name="one")
    train(single)
    run_ddp([*args, *dump(tmp_path / "straight")], tmp_path / "straight")
    one, rank0, rank1 = (
        torch.load(tmp_path / p, weights_only=True)
        for p in ("one/rank0.pt", "straight/rank0.pt", "straight/rank1.pt")
    )
    unet_keys = [k for k in one if k.startswith("unet.")]
    ema_keys = [k for k in one if k.startswith("unet_ema.module.")]
    assert unet_keys and ema_keys
    assert max_difference(one, rank0, unet_keys + ema_keys + ["scale_factor"]) <= TOLERANCE
    assert all(torch.equal(rank0[k], rank1[k]) for k in ema_keys)  # the EMA is identical on every rank
    assert float(one["unet.out.2.weight"].abs().max()) > 0  # trained: the zero-initialised output layer moved

    # the whole process group: both ranks, a node lost
    kill = [
        "+callbacks.signal._target_=tests.signal_at_step.SignalAtStep",
        "+callbacks.signal.step=9",
        "+callbacks.signal.group=true",
    ]
    run_ddp([*args, *kill], tmp_path / "ddp", expect_signal=signal.SIGKILL)
    last = next((tmp_path / "ddp").glob("*/runs/*/checkpoints/last.ckpt"))
    assert torch.load(last, weights_only=True)["global_step"] == 8
    run_ddp([*args, "ckpt_path=last", *dump(tmp_path / "resumed")], tmp_path / "ddp")
    for rank in (0, 1):
        resumed, straight = (
            torch.load(tmp_path / p / f"rank{rank}.pt", weights_only=True) for p in ("resumed", "straight")
        )
        keys = [k for k in straight if k.startswith(("unet.", "unet_ema.module."))]
        assert max_difference(resumed, straight, keys) == 0.0  # same ranks, same order: bit-exact


def test_ddp_lora_matches_one_process_and_encodes_the_latent_cache_once(compose_cfg, base_ckpt, tmp_path):  # noqa: F811
    """LoRA fine-tune of a txt2img model, with a disk latent cache written once (rank zero) and read by
    DDP."""
    lora = [*LORA, *COMMON, f"model.base={base_ckpt}", f"data.cache_dir={tmp_path / 'cache'}"]
    single = compose_cfg([*lora, "data.batch_size=4", *dump(tmp_path / "lora_one")], output_name="lora_one")
    train(single)
    caches = sorted((tmp_path / "cache").glob("latents_*.pt"))
    assert len(caches) == 1
    inode = caches[0].stat().st_ino  # a rewrite (atomic: a new file moved into place) changes it; a read only
    run_ddp([*lora, *dump(tmp_path / "lora_two")], tmp_path / "ddp")  # marks it used (its mtime: LRU)
    assert caches[0].stat().st_ino == inode  # same data, same VAE: read, not re-encoded
    one, rank0, rank1 = (
        torch.load(tmp_path / p, weights_only=True)
        for p in ("lora_one/rank0.pt", "lora_two/rank0.pt", "lora_two/rank1.pt")
    )
    lora_keys = [k for k in one if "lora_" in k]
    assert lora_keys
    assert max_difference(one, rank0, lora_keys) <= TOLERANCE
    assert max_difference(rank0, rank1, lora_keys) == 0.0


def test_ddp_sigkill_then_resume_with_a_methods_own_dropout(tmp_path, base_ckpt):  # noqa: F811
    """A hypernetwork with dropout 0.3 (draws from the global RNG every step) under DDP: both ranks killed
    after the step-8 checkpoint, resumed with `ckpt_path=last`: every rank ends with the uninterrupted run's
    MLPs (the ranks' RNG streams are restored, not only rank 0's)."""
    # dropout [0, 0.3, 0], lr 1e-2
    args = [
        o
        for o in method_overrides("hypernetwork_star", base_ckpt, tmp_path / "class_images")
        if not o.startswith("data.batch_size")
    ]
    kill = [
        "+callbacks.signal._target_=tests.signal_at_step.SignalAtStep",
        "+callbacks.signal.step=9",
        "+callbacks.signal.group=true",
    ]
    run_ddp([*args, *dump(tmp_path / "straight")], tmp_path / "straight")
    run_ddp([*args, *kill], tmp_path / "ddp", expect_signal=signal.SIGKILL)
    run_ddp([*args, "ckpt_path=last", *dump(tmp_path / "resumed")], tmp_path / "ddp")
    for rank in (0, 1):
        resumed, straight = (
            torch.load(tmp_path / p / f"rank{rank}.pt", weights_only=True) for p in ("resumed", "straight")
        )
        keys = [k for k in straight if "hypernetwork" in k or k.startswith("method.")]
        assert keys, sorted(straight)[:10]
        assert max_difference(resumed, straight, keys) == 0.0  # another dropout mask: ~2e-7
