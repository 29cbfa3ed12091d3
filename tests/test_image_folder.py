"""ImageFolderDataset / ImageFolderDataModule on small folders built in tmp_path."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.image_folder import (
    ImageFolderDataModule,
    ImageFolderDataset,
    find_image_files,
    scan_image_folder,
)
from datamodules.transforms import load_rgb

LOGGER = "datamodules.image_folder"
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(color, size=(16, 16), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def halves(size=(16, 16), left=RED, right=BLUE) -> Image.Image:
    """Left half ``left``, right half ``right``."""
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def mean_rgb(tensor: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> mean colour on the 0-255 scale."""
    return ((tensor.mean(dim=(1, 2)) + 1) * 127.5).numpy()


def assert_image_tensor(tensor: torch.Tensor, resolution: int) -> None:
    assert tensor.dtype == torch.float32
    assert tuple(tensor.shape) == (3, resolution, resolution)
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0


# ------------------------------------------------------------------------------------ captions


def test_sidecar_captions_metadata_and_default(tmp_path):
    solid(RED).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n", encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    solid(GREEN).save(sub / "b.JPG")  # upper-case extension, nested folder
    solid(BLUE).save(sub / "c.webp")
    lines = [{"file_name": "sub/b.JPG", "text": "a green thing"}, {"file_name": "a.png", "text": "ignored"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "notes.md").write_text("not an image")

    dataset = ImageFolderDataset(tmp_path, resolution=8, default_caption="something")
    captions = {r.path.name: dataset.caption(r) for r in dataset.records}
    # sidecar beats metadata, metadata is relative to its own folder, missing -> default
    assert captions == {"a.png": "a red thing", "b.JPG": "a green thing", "c.webp": "something"}
    assert len(dataset) == 3
    for k in range(3):
        item = dataset[k]
        assert set(item) == {"image", "caption"}
        assert_image_tensor(item["image"], 8)


def test_metadata_in_subfolder_and_bad_lines(tmp_path, caplog):
    sub = tmp_path / "set"
    sub.mkdir()
    solid(RED).save(sub / "x.png")
    (sub / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "deep"}\nnot json\n')
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert dataset[0]["caption"] == "deep"
    assert any("line 2" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------- pixel modes


def _save_modes(root):
    """Files in every awkward mode, with the expected mean colour after loading."""
    expected = {}
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent -> white
    rgba.paste((255, 0, 0, 255), (0, 0, 16, 8))  # top half opaque red
    rgba.save(root / "rgba.png")
    expected["rgba.png"] = (255, 127.5, 127.5)
    Image.new("LA", (16, 16), (0, 0)).save(root / "la.png")  # transparent black -> white
    expected["la.png"] = (255, 255, 255)
    solid(128, mode="L").save(root / "gray.png")
    expected["gray.png"] = (128, 128, 128)
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    palette.save(root / "palette.png")
    expected["palette.png"] = GREEN
    transparent = palette.copy()
    transparent.paste(1, (0, 0, 8, 16))  # left half index 1, which is transparent
    transparent.save(root / "palette_transparent.png", transparency=1)
    expected["palette_transparent.png"] = (127.5, 255, 127.5)
    transparent.save(root / "palette_transparent.gif", transparency=1)
    expected["palette_transparent.gif"] = (127.5, 255, 127.5)
    solid((0, 255, 255, 0), mode="CMYK").save(root / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = RED
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(root / "white16.png")
    expected["white16.png"] = (255, 255, 255)
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(root / "mid16.tif")
    expected["mid16.tif"] = (128, 128, 128)
    Image.fromarray(np.full((16, 16), 65535, np.int32)).save(root / "white32.tif")  # opens as mode "I"
    expected["white32.tif"] = (255, 255, 255)
    solid(BLUE).save(root / "plain.bmp")
    expected["plain.bmp"] = BLUE
    return expected


def test_modes_convert_to_rgb_with_right_content(tmp_path):
    expected = _save_modes(tmp_path)
    assert Image.open(tmp_path / "white16.png").mode.startswith("I;16")
    assert Image.open(tmp_path / "white32.tif").mode == "I"
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    dataset = ImageFolderDataset(tmp_path, resolution=16)
    assert sorted(r.path.name for r in dataset.records) == sorted(expected)
    for k, record in enumerate(dataset.records):
        item = dataset[k]
        assert_image_tensor(item["image"], 16)
        np.testing.assert_allclose(
            mean_rgb(item["image"]), expected[record.path.name], atol=4, err_msg=record.path.name
        )
    white = dataset[[r.path.name for r in dataset.records].index("white16.png")]["image"]
    assert white.min() > 0.99  # 16-bit white is +1, not clipped garbage


def test_exif_orientation_applied(tmp_path):
    stored = halves(size=(40, 20))  # 40 wide, 20 tall: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    upright = load_rgb(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)  # now portrait
    top, bottom = np.asarray(upright)[:10].mean((0, 1)), np.asarray(upright)[-10:].mean((0, 1))
    assert top[0] > 200 and top[2] < 50  # red on top
    assert bottom[2] > 200 and bottom[0] < 50  # blue at the bottom

    item = ImageFolderDataset(tmp_path, resolution=20, center_crop=True)[0]
    assert_image_tensor(item["image"], 20)  # a 20-wide portrait crops to 20 x 20 from its middle
    upper = mean_rgb(item["image"][:, :5])
    assert upper[0] > 200 and upper[2] < 60


# ----------------------------------------------------------------------------- resize and crop


def test_non_square_resized_and_cropped(tmp_path):
    image = Image.new("RGB", (90, 30), RED)  # thirds: red | green | blue
    image.paste(GREEN, (30, 0, 60, 30))
    image.paste(BLUE, (60, 0, 90, 30))
    image.save(tmp_path / "wide.png")
    Image.new("RGB", (20, 50), GREEN).save(tmp_path / "tall.png")

    centered = ImageFolderDataset(tmp_path, resolution=12, center_crop=True)
    for k in range(2):
        assert_image_tensor(centered[k]["image"], 12)
        np.testing.assert_allclose(mean_rgb(centered[k]["image"]), GREEN, atol=3)

    torch.manual_seed(0)
    random_crops = ImageFolderDataset(
        tmp_path, resolution=12, center_crop=False, files=[tmp_path / "wide.png"]
    )
    means = []
    for epoch in range(20):
        random_crops.set_epoch(epoch)
        means.append(mean_rgb(random_crops[0]["image"]))
        assert torch.equal(random_crops[0]["image"], random_crops[0]["image"])  # the epoch's crop, every time
    means = np.stack(means)
    assert means[:, 0].max() - means[:, 0].min() > 50  # crops land in different places across epochs


def test_random_flip_probability(tmp_path):
    halves().save(tmp_path / "halves.png")
    never = ImageFolderDataset(tmp_path, resolution=16, random_flip=0.0)
    always = ImageFolderDataset(tmp_path, resolution=16, random_flip=1.0)
    for _ in range(5):
        left = mean_rgb(never[0]["image"][:, :, :8])
        assert left[0] > 250 and left[2] < 5
        left = mean_rgb(always[0]["image"][:, :, :8])
        assert left[2] > 250 and left[0] < 5


def test_repeats_and_caption_dropout(tmp_path):
    for k in range(3):
        solid(RED).save(tmp_path / f"{k}.png")
        (tmp_path / f"{k}.txt").write_text(f"caption {k}")
    assert len(ImageFolderDataset(tmp_path, resolution=8, repeats=4)) == 12
    repeated = ImageFolderDataset(tmp_path, resolution=8, repeats=2)
    assert repeated[0]["caption"] == repeated[3]["caption"] == "caption 0"
    dropped = ImageFolderDataset(tmp_path, resolution=8, caption_dropout=1.0)
    assert {dropped[k]["caption"] for k in range(3)} == {""}


# --------------------------------------------------------------------------- unreadable files


def test_corrupt_files_skipped_with_warnings(tmp_path, caplog):
    for k in range(3):
        solid(GREEN).save(tmp_path / f"good{k}.png")
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "PNG"
    )
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not a PNG")

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        records = scan_image_folder(tmp_path)
    assert sorted(r.path.name for r in records) == ["good0.png", "good1.png", "good2.png"]
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    for bad in ("truncated.png", "empty.jpg", "text.png"):
        assert sum(bad in m and "skipping" in m for m in messages) == 1, (bad, messages)
    summaries = [m for m in messages if m.startswith("skipped")]
    assert len(summaries) == 1 and "skipped 3 of 6 files" in summaries[0]

    caplog.clear()
    module = ImageFolderDataModule(tmp_path, resolution=8, batch_size=2, val_size=1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        module.setup("fit")
    assert len(module.data_train) == 2 and len(module.data_val) == 1
    batch = next(iter(module.train_dataloader()))
    assert tuple(batch["image"].shape) == (2, 3, 8, 8)


def test_missing_and_empty_folders_fail_clearly(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolderDataset(missing)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        ImageFolderDataModule(missing)  # at construction, before any trainer exists

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty"):
        ImageFolderDataset(empty)
    module = ImageFolderDataModule(empty)
    with pytest.raises(ValueError, match="no readable images"):
        module.setup("fit")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.png").write_bytes(b"\x89PNG nope")
    with pytest.raises(ValueError, match="broken"):
        ImageFolderDataset(broken)


def test_find_image_files_ignores_hidden_and_other_files(tmp_path):
    solid(RED).save(tmp_path / "a.png")
    solid(RED).save(tmp_path / ".hidden.png")
    (tmp_path / ".cache").mkdir()
    solid(RED).save(tmp_path / ".cache" / "b.png")
    (tmp_path / "a.txt").write_text("caption")
    assert [p.name for p in find_image_files(tmp_path)] == ["a.png"]


# -------------------------------------------------------------------------------- datamodule


def test_datamodule_splits_and_batches(tmp_path):
    for k in range(10):
        Image.new("RGB", (24, 16), (k * 20, 0, 0)).save(tmp_path / f"{k:02d}.png")
        (tmp_path / f"{k:02d}.txt").write_text(f"image {k}")
    module = ImageFolderDataModule(tmp_path, resolution=16, batch_size=4, val_size=3, repeats=2, seed=1)
    module.setup("fit")
    train_paths = {r.path for r in module.data_train.records}
    val_paths = {r.path for r in module.data_val.records}
    assert len(train_paths) == 7 and len(val_paths) == 3 and not train_paths & val_paths
    assert len(module.data_train) == 14 and len(module.data_val) == 3
    assert module.data_val.random_flip == 0.0 and module.data_val.caption_dropout == 0.0

    batch = next(iter(module.train_dataloader()))
    bucket = module.data_train.target_size(0)  # 3:2 images -> a landscape bucket (buckets are the default)
    assert bucket[0] > bucket[1] and tuple(batch["image"].shape) == (4, 3, bucket[1], bucket[0])
    assert isinstance(batch["caption"], list) and all(c.startswith("image ") for c in batch["caption"])
    val_batch = next(iter(module.val_dataloader()))
    assert tuple(val_batch["image"].shape) == (3, 3, bucket[1], bucket[0])
    square = ImageFolderDataModule(tmp_path, resolution=16, batch_size=4, val_size=3, bucketing=False)
    assert tuple(next(iter(square.train_dataloader()))["image"].shape) == (4, 3, 16, 16)

    same = ImageFolderDataModule(tmp_path, resolution=16, val_size=3, seed=1)
    same.setup()
    assert {r.path for r in same.data_val.records} == val_paths  # seeded split

    fraction = ImageFolderDataModule(tmp_path, resolution=16, val_fraction=0.2)
    fraction.setup()
    assert len(fraction.data_val) == 2


def test_datamodule_val_size_zero_uses_train_images_unaugmented(tmp_path):
    for k in range(6):
        halves().save(tmp_path / f"{k}.png")
    module = ImageFolderDataModule(
        tmp_path, resolution=16, val_size=0, random_flip=1.0, caption_dropout=1.0, default_caption="a photo"
    )
    module.setup("fit")
    assert len(module.data_train) == 6
    assert 1 <= len(module.data_val) <= 4
    assert {r.path for r in module.data_val.records} <= {r.path for r in module.data_train.records}
    item = module.data_val[0]
    assert item["caption"] == "a photo"
    assert mean_rgb(item["image"][:, :, :8])[0] > 250  # not flipped
    assert module.data_train[0]["caption"] == ""  # training still drops captions


def test_single_image_folder_trains(tmp_path, caplog):
    solid(RED).save(tmp_path / "only.png")
    module = ImageFolderDataModule(tmp_path, resolution=8, val_size=4)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        module.setup()
    assert len(module.data_train) == 1 and len(module.data_val) == 1
    assert any("only 1 image" in r.getMessage() for r in caplog.records)
