"""Trainer-style folders (kohya ``<repeats>_<name>``), configurable caption files and tag-list captions."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from datamodules.captions import TagAugment, kohya_subset
from datamodules.image_folder import ImageFolderDataModule, ImageFolderDataset


def save(path, size=(16, 16), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_kohya_folders_repeat_and_caption_with_their_name(tmp_path):
    save(tmp_path / "10_sks dog" / "a.png")
    save(tmp_path / "10_sks dog" / "b.png")
    (tmp_path / "10_sks dog" / "b.caption").write_text("sks dog on the beach")
    save(tmp_path / "2_dog" / "c.png")
    save(tmp_path / "loose.png")  # outside any kohya folder: once, default caption
    dataset = ImageFolderDataset(tmp_path, resolution=16, caption_ext=".caption", default_caption="photo")
    captions = Counter(dataset[k]["caption"] for k in range(len(dataset)))
    assert len(dataset) == 10 + 10 + 2 + 1
    assert captions == {"sks dog": 10, "sks dog on the beach": 10, "dog": 2, "photo": 1}
    assert len(ImageFolderDataset(tmp_path, resolution=16, repeats=2)) == 2 * 23  # repeats multiply
    assert kohya_subset(tmp_path, tmp_path / "3_x" / "deep" / "d.png") == (3, "x")
    assert kohya_subset(tmp_path, tmp_path / "5_y.png") is None  # a file, not a folder
    assert kohya_subset(tmp_path, tmp_path / "photos" / "e.png") is None
    with pytest.raises(ValueError, match="repeats >= 1"):
        kohya_subset(tmp_path, tmp_path / "0_none" / "f.png")


def test_kohya_repeats_in_datamodule_train_only(tmp_path, caplog):
    for k in range(4):
        save(tmp_path / "5_ohwx person" / f"{k}.png")
    dm = ImageFolderDataModule(tmp_path, resolution=16, val_size=1, batch_size=2)
    with caplog.at_level("INFO", logger="datamodules.image_folder"):
        dm.setup()
    assert len(dm.data_train) == 3 * 5 and len(dm.data_val) == 1
    assert "'5_ohwx person': 3 image(s) x 5 repeat(s)" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert batch["caption"] == ["ohwx person"] * 2


def test_caption_extension_without_dot(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from the caption file")
    (tmp_path / "a.txt").write_text("from the txt file")
    assert (
        ImageFolderDataset(tmp_path, resolution=16, caption_ext="caption")[0]["caption"]
        == "from the caption file"
    )
    assert ImageFolderDataset(tmp_path, resolution=16)[0]["caption"] == "from the txt file"


def test_tag_shuffle_keeps_first_tags_and_drops_others():
    caption = "sks, dog, red collar, grass, sunny, outdoors"
    shuffle = TagAugment(shuffle=True, keep_tags=2)
    generator = torch.Generator().manual_seed(0)
    outputs = [shuffle(caption, generator) for _ in range(50)]
    for out in outputs:
        tags = out.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags) == sorted(caption.split(", "))
    assert len(set(outputs)) > 10  # the rest is shuffled
    drop = TagAugment(keep_tags=1, tag_dropout=0.5)
    lengths = [len(drop(caption, generator).split(", ")) for _ in range(400)]
    assert all(n >= 1 for n in lengths)
    assert abs(sum(n - 1 for n in lengths) / len(lengths) - 2.5) < 0.3  # half of the 5 other tags
    assert all(drop(caption, generator).startswith("sks") for _ in range(20))
    assert TagAugment()(caption) == caption  # off by default
    assert TagAugment(shuffle=True)("a plain sentence") == "a plain sentence"
    with pytest.raises(ValueError, match="tag_dropout"):
        TagAugment(tag_dropout=1.5)


def test_tag_augmentation_in_training_not_validation(tmp_path):
    for k in range(3):
        save(tmp_path / f"{k}.png")
        (tmp_path / f"{k}.txt").write_text("trigger, a, b, c, d, e")
    dm = ImageFolderDataModule(
        tmp_path, resolution=16, val_size=1, shuffle_tags=True, keep_tags=1, tag_dropout=0.2
    )
    dm.setup()
    train = set()
    for epoch in range(30):  # a new draw each epoch (the sampler calls set_epoch), the same within one
        dm.data_train.set_epoch(epoch)
        train.add(dm.data_train[0]["caption"])
        assert dm.data_train[0]["caption"] == dm.data_train[0]["caption"]
    assert len(train) > 5 and all(c.startswith("trigger") for c in train)
    assert {dm.data_val[0]["caption"] for _ in range(5)} == {"trigger, a, b, c, d, e"}
