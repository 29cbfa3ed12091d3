"""Fine-tuning (LoRA) on a folder of mixed aspect ratios: the latent cache holds each image at its bucket
size (in memory and on disk), every batch is one size, and non-square latents train."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate
from lightning import Callback

from tests.conftest import add_training_callback
from tests.test_buckets import MIXED_SIZES, make_mixed_folder
from tests.test_finetune_lora import FINETUNE_PARTS, base_ckpt  # noqa: F401 - the module fixture
from train import train


class RecordLatents(Callback):
    def __init__(self):
        self.shapes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append(tuple(batch["latent_mean"].shape[-2:]))


@pytest.fixture
def record(monkeypatch):
    recorder = RecordLatents()
    add_training_callback(monkeypatch, recorder)
    return recorder


def test_lora_on_mixed_aspect_folder_caches_latents_per_bucket(compose_cfg, base_ckpt, tmp_path, record):  # noqa: F811
    data = make_mixed_folder(tmp_path / "concept", MIXED_SIZES)
    overrides = [
        "experiment=lora_finetune",
        *FINETUNE_PARTS,
        "debug=smoke",
        f"model.base={base_ckpt}",
        "data=finetune_folder",
        f"data.source.root={data}",
        "data.source.resolution=32",
        "data.batch_size=2",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.log_prompts=[image 1]",
    ]
    cfg = compose_cfg(overrides)
    _, objects = train(cfg)
    dm, model = objects["datamodule"], objects["model"]
    source = dm.source.data_train
    factor = model.vae.downsample_factor
    for variant in (0, 1):  # flip_variants: both variants at the bucket size
        for i in range(len(source)):
            w, h = source.target_size(i)
            assert tuple(dm.cached.means[variant][i].shape[-2:]) == (h // factor, w // factor)
    assert len({tuple(m.shape) for m in dm.cached.means[0]}) >= 3
    assert record.shapes and any(h != w for h, w in record.shapes), record.shapes

    again = instantiate(cfg.data, _convert_="all")  # the disk cache gives the same per-bucket latents
    again.setup("fit")

    def must_not_encode(images):
        raise AssertionError("the latents should come from the disk cache")

    again.cache_latents(must_not_encode, model.data_services().vae_fingerprint())
    assert [tuple(m.shape) for m in again.cached.means[0]] == [tuple(m.shape) for m in dm.cached.means[0]]
    for batch in again.train_dataloader():
        assert batch["latent_mean"].ndim == 4  # stacking works: one size per batch
