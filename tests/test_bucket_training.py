"""Aspect-ratio buckets end to end: the VAE, then txt2img (on that VAE), train on a folder of mixed aspect
ratios made here, every batch from one bucket and non-square ones among them; a resumed run continues at
the next batch of the bucket sampler."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from lightning import Callback

from tests.conftest import add_training_callback
from tests.test_buckets import MIXED_SIZES, make_mixed_folder
from train import train

FOLDER = [
    "data=image_folder",
    "data.resolution=32",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.val_size=2",
    "callbacks.rich_progress_bar=null",
]
VAE = ["experiment=vae", "model/vae=tiny", *FOLDER]
TXT2IMG = [
    "experiment=txt2img",
    "model/vae=tiny",
    "model/unet=tiny",
    "model/text_encoder=tiny",
    *FOLDER,
    "model.log_prompts=[image 1]",
    "model/sampler=ddim",
    "model.sampler.steps=2",
]


class RecordBatches(Callback):
    def __init__(self):
        self.shapes, self.captions = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append(tuple(batch["image"].shape[-2:]))
        self.captions.append(tuple(batch["caption"]))


@pytest.fixture
def record(monkeypatch):
    recorder = RecordBatches()
    add_training_callback(monkeypatch, recorder)
    return recorder


def test_vae_then_txt2img_train_on_bucketed_folder(tmp_path, compose_cfg, record):
    data = make_mixed_folder(tmp_path / "mixed", MIXED_SIZES * 2)
    root = f"data.root={data}"
    vae_cfg = compose_cfg(
        [*VAE, root, "debug=smoke", "trainer.max_steps=6", "trainer.limit_train_batches=6"], output_name="vae"
    )
    metrics, _ = train(vae_cfg)
    assert "val/psnr" in metrics
    assert len(record.shapes) == 6 and any(h != w for h, w in record.shapes), record.shapes
    assert len(set(record.shapes)) >= 2
    record.shapes.clear()

    cfg = compose_cfg([*TXT2IMG, root, "debug=smoke"], output_name="txt2img")  # finds the VAE run above
    metrics, _ = train(cfg)
    assert "train/loss" in metrics and "val/loss" in metrics
    assert any(h != w for h, w in record.shapes), record.shapes
    images = list((Path(cfg.paths.output_dir) / "images").glob("samples_*.png"))
    assert images


def test_resume_continues_at_the_next_bucket_batch(tmp_path, compose_cfg, record):
    data = make_mixed_folder(tmp_path / "mixed", MIXED_SIZES * 3)
    base = [
        *VAE,
        f"data.root={data}",
        "debug=smoke",
        "trainer.limit_train_batches=1.0",
        "trainer.max_epochs=-1",
        "trainer.val_check_interval=100",
    ]
    train(compose_cfg([*base, "trainer.max_steps=7"], output_name="full"))
    uninterrupted = list(record.captions)
    assert len(uninterrupted) == 7
    record.captions.clear()

    train(compose_cfg([*base, "trainer.max_steps=3"], output_name="first"))
    assert record.captions == uninterrupted[:3]
    record.captions.clear()
    last = tmp_path / "logs" / "vae" / "runs" / "first" / "checkpoints" / "last.ckpt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose_cfg([*base, "trainer.max_steps=7", f"ckpt_path={last}"], output_name="second"))
    assert record.captions == uninterrupted[3:], "the resumed run must continue at batch 3 of the same order"
    assert not [w for w in caught if "not resumable" in str(w.message)]  # Lightning knows the loader resumes
