"""Shared files name their base by file name + content hash, never by local path."""

from __future__ import annotations

import hashlib
import os

from ldm.utils.file_identity import describe_source, sha256_of
from tests.test_finetune_lora import base_ckpt  # noqa: F401 - fixture


def test_describe_source_has_name_and_hash_but_no_path(tmp_path):
    model = tmp_path / "secret_user" / "models" / "base.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    info = describe_source(model)
    import hashlib

    assert info == {"name": "base.safetensors", "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert "secret_user" not in str(info) and len(info["sha256"]) == 64
    model.write_bytes(b"other weights")
    assert describe_source(model)["sha256"] != info["sha256"]  # content, not name


def test_hash_of_a_file_replaced_with_the_same_size_and_mtime_is_new(tmp_path):
    """``cp -p`` of another file of the same size and time: the remembered hash must not be reused."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"first bytes")
    before = path.stat()
    assert sha256_of(path) == hashlib.sha256(b"first bytes").hexdigest()
    path.write_bytes(b"other bytes")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert sha256_of(path) == hashlib.sha256(b"other bytes").hexdigest()


def test_folder_and_hub_id(tmp_path):
    folder = tmp_path / "home" / "me" / "sd15"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "model.safetensors").write_bytes(b"u")
    info = describe_source(folder)
    assert info["name"] == "sd15" and "home" not in str(info)
    assert describe_source("runwayml/stable-diffusion-v1-5") == {"name": "runwayml/stable-diffusion-v1-5"}


def test_lora_export_names_its_base_by_name_and_hash_only(compose_cfg, base_ckpt, tmp_path):  # noqa: F811 - pytest fixture
    import hashlib
    from pathlib import Path

    from ldm.io.safe_load import read_safetensors_metadata as read_kohya_metadata
    from tests.test_finetune_lora import lora_overrides
    from train import train

    cfg = compose_cfg(
        lora_overrides(
            base_ckpt,
            ["data.cache_dir=null", "trainer.max_steps=2", "logger=none", "callbacks.lr_monitor=null"],
        )
    )
    train(cfg)
    meta = read_kohya_metadata(Path(cfg.paths.output_dir) / "adapters" / "lora_finetune.safetensors")
    assert meta["ss_sd_model_name"] == base_ckpt.name
    assert meta["ss_new_sd_model_hash"] == hashlib.sha256(base_ckpt.read_bytes()).hexdigest()
    leaked = {k: v for k, v in meta.items() if str(base_ckpt.parent) in v or str(tmp_path) in v}
    assert not leaked, leaked


def _convert_script():
    from tests.conftest import load_script

    return load_script("scripts/convert.py")


def test_convert_records_the_base_by_name_and_hash_writes_normal_permissions(base_ckpt, tmp_path):  # noqa: F811 - pytest fixture
    import hashlib
    import os

    from ldm.io.safe_load import read_safetensors_metadata

    out = _convert_script().main(
        ["--base", str(base_ckpt), "--out", str(tmp_path / "out" / "model.safetensors")]
    )
    meta = read_safetensors_metadata(out)
    assert meta["ldm.source"] == base_ckpt.name
    assert meta["ldm.source_sha256"] == hashlib.sha256(base_ckpt.read_bytes()).hexdigest()
    assert not [k for k, v in meta.items() if str(base_ckpt.parent) in v]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]


def test_failed_convert_leaves_no_temporary_file(base_ckpt, tmp_path, monkeypatch):  # noqa: F811 - pytest fixture
    import pytest
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="No space"):
        _convert_script().main(
            ["--base", str(base_ckpt), "--out", str(tmp_path / "out" / "model.safetensors")]
        )
    assert list((tmp_path / "out").iterdir()) == []
