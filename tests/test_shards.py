"""WebDataset shards: made from the embedded data (identical images back) and from a folder (captions,
buckets, kohya repeats), readable by webdataset itself, and trained from with data=shards."""

from __future__ import annotations

import gc
import json
import warnings

import pytest
import torch
import webdataset as wds

from datamodules.shapes import ShapesDataModule
from datamodules.shards import ShardsDataModule, read_index
from tests.conftest import load_script
from tests.test_buckets import MIXED_SIZES, make_mixed_folder
from train import train

MAKE_SHARDS = load_script("scripts/make_shards.py").main  # `python scripts/make_shards.py <argv>`


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_shards")
    MAKE_SHARDS(
        [
            "--shapes",
            "--train-size",
            "40",
            "--val-size",
            "8",
            "--resolution",
            "32",
            "--shard-size",
            "16",
            "--out",
            str(out),
        ]
    )
    return out


def test_shapes_shards_give_back_the_in_memory_images(shapes_shards):
    index = read_index(shapes_shards)
    assert index["splits"]["train"]["shards"] == [f"train-{k:06d}.tar" for k in range(3)]
    shapes = ShapesDataModule(resolution=32, train_size=40, val_size=8)
    shapes.setup()
    dm = ShardsDataModule(str(shapes_shards), resolution=32, batch_size=4, val_size=8)
    dm.setup()
    assert len(dm.data_train) == 40 and len(dm.data_val) == 8
    for k in (0, 17, 39):
        expected, got = shapes.data_train[k], dm.data_train[k]
        assert got["caption"] == expected["caption"]
        torch.testing.assert_close(got["image"], expected["image"], rtol=0, atol=0)  # lossless, same pixels
    torch.testing.assert_close(dm.data_val[3]["image"], shapes.data_val[3]["image"], rtol=0, atol=0)
    capped = ShardsDataModule(str(shapes_shards), resolution=32, train_size=10)
    capped.setup()
    assert len(capped.data_train) == 10


def test_folder_shards_keep_captions_buckets_and_repeats(tmp_path):
    make_mixed_folder(tmp_path / "photos")
    make_mixed_folder(tmp_path / "photos" / "3_sks thing", MIXED_SIZES[:2])
    for k in range(2):  # kohya folder images without caption files: the folder name is the caption
        (tmp_path / "photos" / "3_sks thing" / f"img{k}.txt").unlink()
    out = tmp_path / "shards"
    MAKE_SHARDS(
        ["--folder", str(tmp_path / "photos"), "--out", str(out), "--resolution", "64", "--shard-size", "4"]
    )
    samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("train-*.tar")), shardshuffle=False))
    assert len(samples) == 10 and {"png", "txt", "json", "__key__"} <= set(samples[0])  # a plain WebDataset
    assert all(b"bucket" in s["json"] for s in samples)
    dm = ShardsDataModule(str(out), resolution=64, batch_size=2, val_size=1, bucket_step=16)
    dm.setup()
    train_set = dm.data_train
    repeats = [train_set.record_repeats(k) for k in range(train_set.num_records())]
    kohya = [k for k in range(train_set.num_records()) if train_set.record_caption(k) == "sks thing"]
    assert (
        kohya and all(repeats[k] == 3 for k in kohya) and len(train_set) == sum(repeats) == 9 + 2 * len(kohya)
    )
    captions = [train_set[k]["caption"] for k in range(len(train_set))]
    assert captions.count("sks thing") == 3 * len(kohya)
    shapes = set()
    for batch in dm.train_dataloader():
        assert len({tuple(i.shape) for i in batch["image"]}) == 1
        shapes.add(tuple(batch["image"].shape[-2:]))
    assert any(h != w for h, w in shapes)


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_shards.py"):
        ShardsDataModule(str(tmp_path))


def test_vae_and_txt2img_train_from_shards(shapes_shards, compose_cfg):
    data = [
        "data=shards",
        f"data.path={shapes_shards}",
        "data.resolution=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "callbacks.rich_progress_bar=null",
    ]
    metrics, _ = train(compose_cfg(["experiment=vae", "model/vae=tiny", *data, "debug=smoke"], "vae"))
    assert "val/psnr" in metrics
    cfg = compose_cfg(
        [
            "experiment=txt2img",
            "model/vae=tiny",
            "model/unet=tiny",
            "model/text_encoder=tiny",
            *data,
            "debug=fdr",
            "model.log_prompts=[a red circle on a blue background]",
            "model/sampler=ddim",
            "model.sampler.steps=2",
        ],
        "txt2img",
    )
    metrics, objects = train(cfg)
    assert "train/loss" in metrics and len(objects["datamodule"].data_train) == 40


def test_data_loading_benchmark_cases_run(tmp_path, capsys):
    """benchmarks/data_loading.py's parts, in-process and tiny: folder generation, the three start-up cases,
    shards and the throughput loop."""
    from benchmarks.data_loading import child, generate_folder
    from scripts.make_shards import main as make_shards

    folder = tmp_path / "folder"
    generate_folder(folder, 40)
    assert len(list(folder.glob("*/*.jpg"))) == 40 and len(list(folder.glob("*/*.txt"))) == 40
    for kind in ("decode", "header", "header"):  # the second header run reads the cached index
        child(kind, str(folder), str(tmp_path / "index"), batches=1)
    assert len(list((tmp_path / "index").glob("index_*.json"))) == 1
    make_shards(["--folder", str(folder), "--out", str(tmp_path / "shards"), "--resolution", "128"])
    child("shards", str(tmp_path / "shards"), "", batches=1)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 4 and all(line["startup_s"] > 0 and line["images_per_s"] > 0 for line in lines)


def test_a_dropped_dataset_leaves_no_open_shard_file(shapes_shards):
    dm = ShardsDataModule(str(shapes_shards), resolution=32, val_size=8)
    dm.setup()
    assert dm.data_train[0]["caption"] and dm.data_val[0]["caption"]  # opens a train and a val shard
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del dm
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [
        str(w.message) for w in caught
    ]


def test_folder_shards_give_size_conditions(tmp_path):
    folder = make_mixed_folder(tmp_path / "images", MIXED_SIZES)
    MAKE_SHARDS(["--folder", str(folder), "--out", str(tmp_path / "shards"), "--val-size", "0"])
    dm = ShardsDataModule(str(tmp_path / "shards"), resolution=32, val_size=0, size_conditions=True)
    dm.setup()
    items = [dm.data_train[k] for k in range(len(dm.data_train))]
    assert {tuple(i["original_size_as_tuple"].tolist()) for i in items} == {(h, w) for w, h in MIXED_SIZES}
    for item in items:
        assert item["target_size_as_tuple"].tolist() == list(item["image"].shape[-2:])
