"""Local Hugging Face datasets (save_to_disk, parquet, imagefolder + metadata.jsonl), offline, bucketed."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from datamodules.hf_dataset import HFDatasetDataModule, load_local_dataset, pick_columns
from tests.test_buckets import MIXED_SIZES, gradient_image
from train import train

FEATURES = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})


def tiny_dataset(n=8) -> datasets.Dataset:
    sizes = (MIXED_SIZES * 2)[:n]
    return datasets.Dataset.from_dict(
        {"image": [gradient_image(w, h) for w, h in sizes], "text": [f"row {k}" for k in range(n)]},
        features=FEATURES,
    )


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "saved"
    tiny_dataset().save_to_disk(str(path))
    return path


def check_module(path, tmp_path, **kwargs):
    dm = HFDatasetDataModule(
        str(path),
        resolution=32,
        batch_size=2,
        val_size=2,
        num_workers=0,
        cache_dir=str(tmp_path / "hf_cache"),
        **kwargs,
    )
    dm.setup()
    assert len(dm.data_train) == 6 and len(dm.data_val) == 2
    shapes, captions = set(), set()
    for batch in dm.train_dataloader():
        assert len({tuple(i.shape) for i in batch["image"]}) == 1  # one bucket per batch
        shapes.add(tuple(batch["image"].shape[-2:]))
        captions.update(batch["caption"])
    assert any(h != w for h, w in shapes)
    return captions


def test_save_to_disk_parquet_and_imagefolder(saved, tmp_path):
    assert check_module(saved, tmp_path) <= {f"row {k}" for k in range(8)}
    parquet = tmp_path / "data.parquet"
    tiny_dataset().to_parquet(str(parquet))
    assert check_module(parquet, tmp_path) <= {f"row {k}" for k in range(8)}
    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    lines = []
    for k, (w, h) in enumerate(MIXED_SIZES):
        gradient_image(w, h).save(folder / f"{k}.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "text": f"file {k}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert check_module(folder.parent, tmp_path) <= {f"file {k}" for k in range(8)}


def test_columns_found_or_named_and_caption_lists(tmp_path):
    data = datasets.Dataset.from_dict(
        {"pixels": [Image.new("RGB", (20, 20))] * 4, "captions": [["a", "b"]] * 4},
        features=datasets.Features(
            {"pixels": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))}
        ),
    )
    assert pick_columns(data, None, None) == ("pixels", "captions")
    with pytest.raises(KeyError, match="set data.caption_column"):
        pick_columns(data, None, "nope")
    data.save_to_disk(str(tmp_path / "lists"))
    dm = HFDatasetDataModule(str(tmp_path / "lists"), resolution=16, val_size=1, batch_size=1)
    dm.setup()
    assert {dm.data_train[0]["caption"] for _ in range(30)} == {"a", "b"}  # a random caption each time
    assert dm.data_val[0]["caption"] == "a"
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_local_dataset(tmp_path / "missing")


def test_vae_trains_from_hf_dataset(saved, compose_cfg):
    cfg = compose_cfg(
        [
            "experiment=vae",
            "model/vae=tiny",
            "data=hf_dataset",
            f"data.path={saved}",
            "data.resolution=32",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.val_size=2",
            "debug=fdr",
        ]
    )
    metrics, _ = train(cfg)
    assert "train/loss" in metrics


def test_size_conditions_give_each_rows_original_size_and_crop(saved, tmp_path):
    dm = HFDatasetDataModule(
        str(saved), resolution=32, val_size=2, cache_dir=str(tmp_path / "hf_cache"), size_conditions=True
    )
    dm.setup()
    originals = set()
    for k in range(len(dm.data_train)):
        item = dm.data_train[k]
        assert item["target_size_as_tuple"].tolist() == list(item["image"].shape[-2:])  # the bucket taken
        originals.add(tuple(item["original_size_as_tuple"].tolist()))
    assert originals <= {(h, w) for w, h in MIXED_SIZES} and len(originals) > 2  # the rows' own sizes
