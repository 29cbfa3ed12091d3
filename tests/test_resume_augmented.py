"""Random augmentations resume exactly: an image folder with random crops, flips and caption dropout (square
crops or aspect-ratio buckets, DataLoader workers) killed mid-epoch and resumed ends with the weights of the
uninterrupted run; with buckets, the cached flip variant each item shows per epoch is the same after a resume
and differs across epochs."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from datamodules.finetune import LatentCacheDataset, bucket_loader
from tests.conftest import compose_train
from tests.test_buckets import MIXED_SIZES, make_mixed_folder
from tests.test_resume_exact import QUIET, max_difference, run_cli, vae_ckpt  # noqa: F401 - vae_ckpt: fixture
from train import train

# 22 training images in batches of 2, 5 batches per epoch, a checkpoint every 2 steps, killed at step 9
SCHEDULE = [
    "debug=smoke",
    "trainer.max_steps=10",
    "trainer.max_epochs=-1",
    "trainer.limit_train_batches=5",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
]


def folder_overrides(root: Path, vae: Path, bucketing: bool) -> list[str]:
    return [
        "experiment=txt2img",
        "model/vae=tiny",
        "model/unet=tiny",
        "model/text_encoder=tiny",
        *QUIET,
        *SCHEDULE,
        "data=image_folder",
        f"data.root={root}",
        "data.resolution=32",
        "data.batch_size=2",
        "data.val_size=2",
        "data.num_workers=1",
        "data.center_crop=false",
        "data.random_flip=0.5",
        "data.caption_dropout=0.3",
        f"data.bucketing={str(bucketing).lower()}",
        f"model.vae_ckpt={vae}",
        "model.log_prompts=[image 1]",
        "model/sampler=ddim",
        "model.sampler.steps=2",
    ]


def final_state(tmp_path: Path, args: list[str], name: str) -> tuple[dict[str, torch.Tensor], int]:
    _, objects = train(compose_train(tmp_path, args, output_name=name))
    state = {k: v.detach().clone() for k, v in objects["model"].state_dict().items()}
    return state, objects["trainer"].global_step


@pytest.mark.parametrize("bucketing", [False, True], ids=["square_crops", "buckets"])
def test_random_crops_flips_and_caption_dropout_resume_exactly(tmp_path, vae_ckpt, bucketing):  # noqa: F811
    root = make_mixed_folder(tmp_path / "images", MIXED_SIZES * 3)
    args = folder_overrides(root, vae_ckpt, bucketing)
    killed = run_cli(args, tmp_path / "logs", "SIGKILL", 9)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed, resumed_step = final_state(tmp_path, [*args, "ckpt_path=last"], "resumed")
    uninterrupted, step = final_state(tmp_path / "straight", args, "straight")
    assert resumed_step == step == 10
    # bit-exact (CPU, fp32): an RNG not restored shows here
    assert max_difference(resumed, uninterrupted) == 0.0


def test_bucketed_flip_variants_per_epoch_are_the_same_after_a_resume():
    sizes = [(4, 4)] * 6 + [(4, 2)] * 6  # two buckets of latents, each with a plain and a flipped variant
    means = [[torch.full((1, h, w), float(i + 1)) for i, (h, w) in enumerate(sizes)] for _ in range(2)]
    means[1] = [-m for m in means[1]]  # the flipped variant is told apart by its sign
    dataset = LatentCacheDataset(means, means, [f"{i}" for i in range(12)], flip_variants=True)

    def epoch_items(loader) -> list[tuple[int, bool]]:
        batches = list(loader)
        return [(int(abs(v)) - 1, bool(v < 0)) for b in batches for v in b["latent_mean"].flatten(1)[:, 0]]

    straight = bucket_loader(dataset, 2, shuffle=True)
    epochs = [epoch_items(straight) for _ in range(3)]
    assert {flip for _, flip in epochs[1]} == {False, True}
    assert sorted(epochs[1]) != sorted(epochs[2])  # the variant of an item changes across epochs
    # a run resumed after 2 batches of epoch 1 continues with the rest of epoch 1, with its flip variants
    resumed = bucket_loader(dataset, 2, shuffle=True, position={"epoch": 1, "batches_done": 2})
    assert epoch_items(resumed) == epochs[1][4:]
    assert epoch_items(resumed) == epochs[2]
