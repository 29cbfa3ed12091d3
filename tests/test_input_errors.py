"""Bad input gives one actionable message that names the file: damaged checkpoints and safetensors,
non-UTF-8 captions, images that must be upscaled."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datamodules.image_folder import ImageFolderDataset
from ldm.io.file_checks import DamagedFileError, check_safetensors_file, check_torch_file


def _image(path, size=(8, 8)):
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(path)


def test_non_utf8_caption_is_named_not_mangled(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("a caf\u00e9 on a table".encode("cp1252"))
    with pytest.raises(
        ValueError, match=r"caption file .*a\.txt is not UTF-8 text \(byte 0xe9 at position 5\)"
    ):
        ImageFolderDataset(tmp_path, resolution=8)


def test_utf8_caption_with_bom_reads_cleanly(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffa caf\u00e9".encode())
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert dataset[0]["caption"] == "a caf\u00e9"


def test_text_file_as_checkpoint_is_named(tmp_path):
    bad = tmp_path / "model.ckpt"
    bad.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(DamagedFileError, match=r"model\.ckpt is a text file"):
        check_torch_file(bad)


def test_bad_safetensors_is_named(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_text("<html>404 Not Found</html>")
    with pytest.raises(DamagedFileError, match=r"model\.safetensors is a text file"):
        check_safetensors_file(bad)


def test_truncated_safetensors_is_named(tmp_path):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(good))
    check_safetensors_file(good)
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(DamagedFileError, match=r"model\.safetensors is truncated"):
        check_safetensors_file(good)


def test_tiny_image_is_upscaled_with_a_warning(tmp_path, caplog):
    from datamodules.image_folder import ImageFolderDataModule

    _image(tmp_path / "dot.png", size=(1, 1))
    _image(tmp_path / "ok.png", size=(16, 16))
    dm = ImageFolderDataModule(tmp_path, resolution=16, val_size=0, batch_size=1)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert "1 of 2 images are smaller than the training resolution 16 px" in caplog.text
    assert "dot.png (1x1)" in caplog.text and "ok.png" not in caplog.text.split("upscaled")[1]


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("model.safetensors", b"<html>404</html>", "is a text file"),
        ("model.safetensors", b"\xff" * 64, "is damaged or not a .safetensors file"),
        ("model.ckpt", b"version https://git-lfs.github.com/spec/v1\n", "is a text file"),
        ("model.ckpt", b"PK\x03\x04 truncated zip", "is damaged or truncated"),
    ],
)
def test_loaders_name_the_damaged_file(tmp_path, name, content, expected):
    from ldm.io.safe_load import read_checkpoint
    from ldm.models.base_loader import load_base_model

    bad = tmp_path / name
    bad.write_bytes(content)
    for load in (read_checkpoint, load_base_model):
        with pytest.raises(DamagedFileError, match=f"{name} {expected}"):
            load(bad)
