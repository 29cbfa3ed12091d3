"""ldm/utils helpers shared by every layer: atomic writes, the cache folder, hub ids, atomic image saves."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from ldm.utils.files import atomic_save_safetensors, atomic_write, atomic_write_text, cache_dir
from ldm.utils.hub import hub_offline, looks_like_hub_id
from ldm.utils.images import save_image


def test_atomic_write_replaces_whole_files_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "one")
    assert target.read_text() == "one"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600

    def failing(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_text() == "one"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]

    before = target.stat().st_mtime_ns
    atomic_write_text(target, "one", only_if_changed=True)
    assert target.stat().st_mtime_ns == before


def test_atomic_save_safetensors_round_trip(tmp_path):
    from safetensors import safe_open

    path = atomic_save_safetensors({"w": torch.arange(3.0)}, tmp_path / "a.safetensors", {"k": "v"})
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"k": "v"}
        assert torch.equal(handle.get_tensor("w"), torch.arange(3.0))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path))
    assert cache_dir("a", "b") == tmp_path / "a" / "b"


def test_hub_ids_and_offline(monkeypatch):
    assert looks_like_hub_id("runwayml/stable-diffusion-v1-5")
    assert not looks_like_hub_id("gpt2") and looks_like_hub_id("gpt2", require_namespace=False)
    for not_an_id in ("model.safetensors", "org/model.ckpt", "./org/name", "~/x", "/abs/path", "a/b/c"):
        assert not looks_like_hub_id(not_an_id, require_namespace=False), not_an_id
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not hub_offline()


def test_save_image_uses_the_suffix_format(tmp_path):
    image = Image.new("RGB", (4, 2), (255, 0, 0))
    path = save_image(image, tmp_path / "x.png")
    with Image.open(path) as back:
        assert back.format == "PNG" and back.size == (4, 2)
    with pytest.raises(ValueError, match="unknown image suffix"):
        save_image(image, tmp_path / "x.nope")
