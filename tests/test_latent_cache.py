"""The latent cache is keyed by everything that feeds it, written atomically, and rebuilt when damaged."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.finetune import FineTuneDataModule
from datamodules.image_folder import ImageFolderDataModule

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def make_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k, color in enumerate(COLORS):
        pixels = np.zeros((16, 16, 3), np.uint8)
        pixels[:, :8] = color  # left half coloured: flipping changes the image
        Image.fromarray(pixels).save(root / f"{k}.png")
        (root / f"{k}.txt").write_text(f"caption {k}")
    return root


class CountingEncoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, images: torch.Tensor):
        self.calls += 1
        mean = torch.nn.functional.avg_pool2d(images, 4)
        return mean, torch.ones_like(mean)


def cached(root: Path, cache: Path, resolution: int = 16, vae: str = "vae-a", flip: bool = False, **options):
    source = ImageFolderDataModule(root, resolution=resolution, val_size=0, batch_size=2, random_flip=0.0)
    dm = FineTuneDataModule(
        source, batch_size=2, cache_dir=str(cache), flip_variants=flip, validation="none", **options
    )
    dm.setup()
    encoder = CountingEncoder()
    dm.cache_latents(encoder, vae)
    return dm, encoder.calls > 0


def test_second_run_uses_the_cache(tmp_path):
    root, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    assert cached(root, cache)[1]
    dm, encoded = cached(root, cache)
    assert not encoded and len(dm.cached) == 4
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # no temporary files left


@pytest.mark.parametrize("change", ["caption", "later_image", "resolution", "vae", "flip_variants"])
def test_anything_that_feeds_the_cache_invalidates_it(tmp_path, change):
    root, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    cached(root, cache)
    kwargs = {}
    if change == "caption":
        (root / "3.txt").write_text("a different caption")
    elif change == "later_image":  # same size, later in the folder
        Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(root / "3.png")
        os.utime(root / "3.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    elif change == "resolution":
        kwargs["resolution"] = 8
    elif change == "vae":
        kwargs["vae"] = "vae-b"
    else:
        kwargs["flip"] = True
    dm, encoded = cached(root, cache, **kwargs)
    assert encoded, f"changing the {change} did not invalidate the cache"
    if change == "caption":
        assert dm.cached.captions[3] == "a different caption"


@pytest.mark.parametrize("damage", ["truncated", "text", "wrong_shape"])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    root, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    cached(root, cache)
    (path,) = cache.glob("latents_*.pt")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "text":
        path.write_text("oops")
    else:
        state = torch.load(path, weights_only=True)
        state["means"] = state["means"][:, :2]
        torch.save(state, path)
    with caplog.at_level("WARNING"):
        dm, encoded = cached(root, cache)
    assert encoded and f"latent cache {path} is damaged or stale" in caplog.text
    assert len(dm.cached) == 4
    assert cached(root, cache)[1] is False  # the rebuilt file is good


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    root, cache = make_folder(tmp_path / "data"), tmp_path / "cache"

    def dies(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        cached(root, cache)
    assert list(cache.iterdir()) == []


def test_flip_variants_are_chosen_per_epoch_without_the_global_rng(tmp_path):
    root, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    dm, _ = cached(root, cache, flip=True)
    view = dm.cached.with_repeats(8)
    state = torch.get_rng_state()
    picks = [
        [bool(torch.equal(view[i]["latent_mean"], dm.cached.means[1, i % 4])) for i in range(32)]
        for view.epoch in (0, 1)
    ]
    assert torch.equal(state, torch.get_rng_state())
    assert any(picks[0]) and not all(picks[0]) and picks[0] != picks[1]
    view.set_epoch(0)
    assert picks[0] == [
        bool(torch.equal(view[i]["latent_mean"], dm.cached.means[1, i % 4])) for i in range(32)
    ]


def replace_keeping_size_and_time(path: Path, pixels: np.ndarray) -> None:
    """What ``cp -p other.png path`` does when other.png has the same size and modification time: new bytes,
    the same stat size and mtime."""
    before = path.stat()
    Image.fromarray(pixels).save(path)
    assert path.stat().st_size == before.st_size, "pick pixels that compress to the same size"
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_cache_check_hash_sees_an_image_replaced_with_the_same_size_and_mtime(tmp_path):
    root, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    first, encoded = cached(root, cache, cache_check="hash")
    assert encoded and cached(root, cache, cache_check="hash")[1] is False  # unchanged bytes: a cache hit
    cached(root, cache)  # the default (stat) entry too
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:, :8] = COLORS[3][::-1]  # another colour, the same PNG size
    replace_keeping_size_and_time(root / "0.png", pixels)

    assert cached(root, cache)[1] is False  # the default check: same path, size, mtime -> the old latents
    dm, encoded = cached(root, cache, cache_check="hash")
    assert encoded, "data.cache_check=hash reused latents of the image's old bytes"
    assert not torch.equal(dm.cached.means[0, 0], first.cached.means[0, 0])
    with pytest.raises(ValueError, match="data.cache_check must be one of"):
        cached(root, cache, cache_check="md5")


def test_cache_is_bounded_least_recently_used_first(tmp_path, caplog):
    root, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    cached(root, cache, vae="vae-a")
    (entry_a,) = cache.glob("latents_*.pt")
    cached(root, cache, vae="vae-b")
    (entry_b,) = set(cache.glob("latents_*.pt")) - {entry_a}
    now = time.time()
    os.utime(entry_a, (now - 100, now - 100))  # a written first, then b
    os.utime(entry_b, (now - 50, now - 50))
    dead = cache / f".latents_x.pt.{2**22 + 12345}.deadbeef.tmp"  # a killed write, over an hour old
    dead.write_bytes(b"half")
    os.utime(dead, (now - 7200, now - 7200))
    bound = 2.5 * entry_a.stat().st_size / 1e9  # room for two entries

    assert cached(root, cache, vae="vae-a", cache_max_gb=bound)[1] is False  # a is used: now the newest
    assert entry_a.stat().st_mtime > now - 10 and entry_b.exists() and not dead.exists()
    with caplog.at_level("INFO"):
        cached(root, cache, vae="vae-c", cache_max_gb=bound)  # a third entry: b, least recently used, goes
    assert entry_a.exists() and not entry_b.exists() and len(list(cache.glob("latents_*.pt"))) == 2
    assert "removed 1 least recently used or stale file(s)" in caplog.text
    assert cached(root, cache, vae="vae-b", cache_max_gb=bound)[1] is True  # encoded again
    assert (
        cached(root, cache, vae="vae-d", cache_max_gb=None)[1] and len(list(cache.glob("latents_*.pt"))) == 3
    )


def test_clear_cache_script_empties_the_cache(tmp_path, capsys):
    from tests.conftest import load_script

    root, cache = make_folder(tmp_path / "data"), tmp_path / ".cache" / "latents"
    cached(root, cache, vae="vae-a")
    cached(root, cache, vae="vae-b")
    other = tmp_path / ".cache" / "class_images" / "0123"
    other.mkdir(parents=True)
    (other / "00000.png").write_bytes(b"png")
    (cache / "notes.txt").write_text("not ours")
    script = load_script("scripts/clear_cache.py")

    freed = script.main(["--root", str(tmp_path)])
    assert not list(cache.glob("latents_*.pt")) and (cache / "notes.txt").exists() and other.exists()
    assert freed[str(cache)] > 0 and "removed 2 latent cache file(s)" in capsys.readouterr().out
    assert cached(root, cache)[1] is True  # rebuilt on demand
    script.main(["--dir", str(cache), "--root", str(tmp_path), "--all"])
    assert not list(cache.glob("latents_*.pt")) and not other.parent.exists()
