"""Large folders: a header index built once and cached (keyed by names, sizes, mtimes; atomic), broken
files skipped at start-up (bad header) or when first loaded (bad body), with the same warnings."""

from __future__ import annotations

import json
import logging
import os

from PIL import Image

from datamodules import folder_index
from datamodules.image_folder import ImageFolderDataModule, ImageFolderDataset, scan_image_folder

LOGGER = "datamodules.image_folder"


def truncated_png(path, size=(16, 16)):
    """A PNG whose header is fine and whose pixel data stops half way."""
    noise = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    noise.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_folder(root, n=6):
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        Image.new("RGB", (16 + 8 * (k % 3), 16), (40 * k, 0, 0)).save(root / f"{k}.png")
    return root


def test_index_is_cached_and_rebuilt_when_files_change(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    records = scan_image_folder(root, check="header", index_dir=cache)
    assert [r.size for r in records][:3] == [(16, 16), (24, 16), (32, 16)]
    [index_file] = cache.glob("index_*.json")
    assert not list(cache.glob(".*tmp"))  # written atomically: no temp file left behind
    assert len(json.loads(index_file.read_text())["sizes"]) == 6

    reads = []
    original = folder_index.image_size
    monkeypatch.setattr(folder_index, "image_size", lambda p: reads.append(p) or original(p))
    again = scan_image_folder(root, check="header", index_dir=cache)
    assert reads == [] and [r.size for r in again] == [r.size for r in records]  # no header read

    Image.new("RGB", (40, 16)).save(root / "new.png")  # a new file -> a new key, one rebuild
    assert len(scan_image_folder(root, check="header", index_dir=cache)) == 7
    assert len(reads) == 7 and len(list(cache.glob("index_*.json"))) == 2
    stat = (root / "0.png").stat()
    os.utime(root / "0.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched -> rebuilt
    scan_image_folder(root, check="header", index_dir=cache)
    assert len(reads) == 14


def test_header_scan_skips_bad_headers_and_lazily_skips_bad_bodies(tmp_path, caplog):
    root = make_folder(tmp_path / "data", n=4)
    (root / "text.png").write_text("not an image")  # bad header: skipped at start-up
    truncated_png(root / "truncated.png")  # valid header, broken body
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        records = scan_image_folder(root, check="header", index_dir=tmp_path / "cache")
    names = {r.path.name for r in records}
    assert "text.png" not in names and "truncated.png" in names
    assert "skipping unreadable image" in caplog.text and "text.png" in caplog.text
    caplog.clear()
    dataset = ImageFolderDataset(root, resolution=16, files=records)
    bad = next(k for k, r in enumerate(dataset.records) if r.path.name == "truncated.png")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        item = dataset[bad]  # replaced by another image of the same bucket
        again = dataset[bad]
    assert tuple(item["image"].shape) == (3, 16, 16) and tuple(again["image"].shape) == (3, 16, 16)
    assert caplog.text.count("truncated.png") == 1  # reported once


def test_decode_scan_is_the_default_for_small_folders(tmp_path, caplog):
    root = make_folder(tmp_path / "data", n=3)
    truncated_png(root / "truncated.png")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        records = scan_image_folder(root)  # auto: decodes every image now
    assert "truncated.png" not in {r.path.name for r in records} and "truncated.png" in caplog.text


def test_datamodule_large_folder_uses_the_index(tmp_path, monkeypatch):
    from datamodules import image_folder

    monkeypatch.setattr(image_folder, "DECODE_ALL_MAX_FILES", 3)
    root = make_folder(tmp_path / "data", n=6)
    dm = ImageFolderDataModule(root, resolution=16, val_size=1, index_dir=str(tmp_path / "cache"))
    dm.setup()
    assert len(list((tmp_path / "cache").glob("index_*.json"))) == 1
    assert next(iter(dm.train_dataloader()))["image"].ndim == 4


def test_header_size_applies_exif_rotation(tmp_path):
    from datamodules.transforms import image_size, load_rgb

    image = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert image_size(tmp_path / "rotated.jpg") == (20, 40) == load_rgb(tmp_path / "rotated.jpg").size
    [record] = scan_image_folder(tmp_path, check="header", index_dir=tmp_path / "cache")
    assert record.size == (20, 40)
