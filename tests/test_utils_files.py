"""ldm/utils helpers shared by every layer: atomic writes, the cache folder, hub ids, atomic image saves."""

from __future__ import annotations

import os
from pathlib import Path

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


# ------------------------------------------------------------------ stale temporary files of killed writes


def dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def killed_write(target) -> None:
    """A process killed while ``atomic_write`` writes ``target`` (``os._exit``: no cleanup runs, as with
    SIGKILL); -> its temporary file is left beside ``target``."""
    import subprocess
    import sys

    code = (
        "import os, sys; from ldm.utils.files import atomic_write\n"
        "def write(tmp):\n    open(tmp, 'wb').write(b'x' * 4096); os._exit(9)\n"
        "atomic_write(sys.argv[1], write)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(target)], check=False, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 9


def test_stale_temp_files_of_killed_writes_are_removed_and_live_ones_kept(tmp_path):
    import time

    from ldm.utils.files import remove_stale_temp_files

    killed_write(tmp_path / "checkpoints" / "last.ckpt")
    (left,) = (tmp_path / "checkpoints").iterdir()
    assert left.name.startswith(".last.ckpt.") and left.name.endswith(".tmp") and left.stat().st_size == 4096
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    dead = adapters / f".lora.safetensors.{dead_pid()}.abc_1234.tmp"
    live = adapters / f".lora.safetensors.{os.getppid()}.abc_1234.tmp"  # a running process is writing it
    legacy_old = tmp_path / ".config.yaml.k2j4h5g6.tmp"  # names from before the pid was added: by age
    legacy_new = tmp_path / ".summary.txt.z9y8x7w6.tmp"
    mine = tmp_path / f".grid.png.{os.getpid()}.qwertyui.tmp"
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "last.ckpt", live, legacy_new, mine]
    for path in [dead, legacy_old, *keep]:
        path.write_bytes(b"data")
    started = time.time()
    os.utime(legacy_old, (started - 3600, started - 3600))
    os.utime(legacy_new, (started + 60, started + 60))  # written after the start: maybe by a live process

    removed = remove_stale_temp_files(tmp_path, before=started)
    assert sorted(removed) == sorted([left, dead, legacy_old])
    assert not left.exists() and not dead.exists() and not legacy_old.exists()
    assert all(p.exists() for p in keep)
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_train_removes_its_run_folders_stale_temp_files_at_start_and_resume(compose_cfg, caplog):
    """`ckpt_path` of a run: its stale temporary files (checkpoints/, adapters/, anywhere in the run) are
    removed and logged before training; files of other runs are left alone."""
    import logging

    from train import train

    old_run = Path(compose_cfg(["experiment=vae"]).paths.log_dir) / "vae" / "runs" / "old"
    (old_run / ".hydra").mkdir(parents=True)
    killed_write(old_run / "checkpoints" / "last.ckpt")
    (old_run / "checkpoints" / "last.ckpt").write_bytes(b"not read: train=false")
    killed_write(old_run / "adapters" / "lora.safetensors")
    other_run = old_run.parent / "other"
    killed_write(other_run / "checkpoints" / "last.ckpt")
    stale = sorted(old_run.rglob("*.tmp"))
    assert len(stale) == 2

    cfg = compose_cfg(
        [
            "experiment=vae",
            "model/vae=tiny",
            "logger=none",
            "train=false",
            f"ckpt_path={old_run / 'checkpoints' / 'last.ckpt'}",
        ],
        output_name="new",
    )
    new_run = Path(cfg.paths.output_dir)
    killed_write(new_run / "images" / "grid.png")  # e.g. a run folder reused with hydra.run.dir=
    with caplog.at_level(logging.INFO):
        train(cfg)
    assert not list(old_run.rglob("*.tmp")) and not list(new_run.rglob("*.tmp"))
    assert len(list(other_run.rglob("*.tmp"))) == 1
    assert "Removed 3 stale temporary file(s) left by killed writes" in caplog.text
    assert str(stale[0]) in caplog.text
