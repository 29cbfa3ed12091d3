"""One ``error: ...`` line for every user mistake, in every entry point (issue 26, item 7): damaged
safetensors/checkpoints given to sample.py and convert.py, a checkpoint of another architecture, a config
value of the wrong type, a full disk, a read-only run folder. ``HYDRA_FULL_ERROR=1`` keeps the traceback."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import sample
from ldm.io.file_checks import DamagedFileError
from ldm.utils.files import DiskFullError, atomic_save_safetensors, atomic_write
from ldm.utils.task import run_main, run_task
from tests.conftest import EXPERIMENTS, ROOT, compose_train, load_script
from tests.readme_commands import env
from tests.test_sample_cli import single_file  # noqa: F401 - pytest fixture (a tiny SD single file)
from train import train

TINY_VAE = [
    "experiment=vae",
    "model/vae=tiny",
    "debug=smoke",
    "data.train_size=8",
    "data.val_size=4",
    "data.batch_size=4",
    "logger=none",
    "callbacks.rich_progress_bar=null",
]


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# the file kinds a user hands over by mistake; each -> (what the message says)
DAMAGED = {
    "empty": (lambda p: _bytes(p, b""), "is empty"),
    "text": (lambda p: _bytes(p, b"<html>404 Not Found</html>"), "is a text file"),
    "truncated": (
        lambda p: _safetensors(
            p, {"w": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, bytes(100)
        ),
        "is truncated",
    ),
    # passes a size check, but the safetensors library refuses it with a SafetensorError that names no file
    "bad header": (
        lambda p: _safetensors(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
        "needs 12 bytes but data_offsets [0, 8] give 8",
    ),
    "unknown dtype": (
        lambda p: _safetensors(p, {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "unknown dtype 'Q7'",
    ),
    "metadata not strings": (
        lambda p: _safetensors(
            p,
            {"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            bytes(8),
        ),
        "__metadata__ is not a map of strings",
    ),
}


def one_error_line(capsys, call) -> str:
    """Run ``call`` (a script's main under ``run_main``): exit status 1 and exactly one stderr line."""
    with pytest.raises(SystemExit) as stop:
        call()
    assert stop.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# -- damaged files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DAMAGED)
def test_every_safetensors_reader_names_a_damaged_file(tmp_path, kind):
    from ldm.io.embeddings import load_embedding
    from ldm.io.hypernetwork_file import read_hypernetwork
    from ldm.io.lora_any import load_lora
    from ldm.io.safe_load import load_safetensors_file, open_safetensors, read_checkpoint
    from ldm.io.safetensors_stream import read_safetensors

    make, expected = DAMAGED[kind]
    bad = make(tmp_path / "model.safetensors")

    def opened(path):
        with open_safetensors(path):
            pass

    readers = [
        read_checkpoint,
        read_safetensors,
        load_safetensors_file,
        opened,
        load_embedding,
        read_hypernetwork,
        lambda p: load_lora(p, unet=torch.nn.Linear(1, 1)),
    ]
    for read in readers:
        with pytest.raises(DamagedFileError) as info:
            read(bad)
        assert f"{bad} " in str(info.value) and expected in str(info.value), (read, info.value)


@pytest.mark.parametrize("flag", ["--ckpt", "--lora", "--embedding"])
@pytest.mark.parametrize("kind", ["empty", "truncated", "bad header"])
def test_sample_py_damaged_file_is_one_line(single_file, tmp_path, capsys, flag, kind):  # noqa: F811
    make, expected = DAMAGED[kind]
    bad = make(tmp_path / "given.safetensors")
    ckpt = bad if flag == "--ckpt" else single_file
    extra = [] if flag == "--ckpt" else [flag, str(bad)]
    line = one_error_line(
        capsys,
        lambda: run_main(
            sample.main,
            [
                "--ckpt",
                str(ckpt),
                "--prompt",
                "x",
                "--n",
                "1",
                "--steps",
                "1",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "out"),
                *extra,
            ],
        ),
    )
    assert f"{bad} " in line and expected in line, line
    assert not (tmp_path / "out" / "grid.png").exists()


@pytest.mark.parametrize("flag", ["--base", "--lora"])
@pytest.mark.parametrize("kind", ["empty", "text", "bad header"])
def test_convert_py_damaged_file_is_one_line(single_file, tmp_path, capsys, flag, kind):  # noqa: F811
    convert = load_script("scripts/convert.py")
    make, expected = DAMAGED[kind]
    bad = make(tmp_path / "given.safetensors")
    base = bad if flag == "--base" else single_file
    extra = [] if flag == "--base" else [flag, str(bad)]
    out = tmp_path / "out.safetensors"
    line = one_error_line(
        capsys, lambda: run_main(convert.main, ["--base", str(base), "--out", str(out), *extra])
    )
    assert f"{bad} " in line and expected in line, line
    assert not out.exists()


def test_damaged_ckpt_to_sample_py_is_one_line(tmp_path, capsys):
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"PK\x03\x04 cut off")
    line = one_error_line(
        capsys,
        lambda: run_main(sample.main, ["--ckpt", str(bad), "--prompt", "x", "--out", str(tmp_path / "out")]),
    )
    assert f"{bad} is damaged or truncated" in line


@pytest.mark.parametrize("script", ["sample.py", "scripts/convert.py"])
def test_the_cli_prints_one_line_and_the_full_trace_on_request(tmp_path, script):
    bad = DAMAGED["bad header"][0](tmp_path / "given.safetensors")
    args = (
        ["--ckpt", str(bad), "--prompt", "x", "--out", str(tmp_path / "o")]
        if script == "sample.py"
        else ["--base", str(bad), "--out", str(tmp_path / "o.safetensors")]
    )
    quiet = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr, quiet.stderr[-3000:]
    assert [line for line in quiet.stderr.splitlines() if line.strip()] == [
        (
            f"error: {bad} is damaged or not a .safetensors file: tensor 'w' (F32 [3]) needs 12 bytes but "
            "data_offsets [0, 8] give 8. Re-download or re-export it. (HYDRA_FULL_ERROR=1 for the full trace)"
        )
    ]
    full = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env={**env(), "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert full.returncode == 1 and "Traceback" in full.stderr and "DamagedFileError" in full.stderr


@pytest.mark.parametrize(
    "script",
    [
        "sample.py",
        "scripts/convert.py",
        *sorted(f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py")),
    ],
)
def test_every_entry_point_runs_main_through_run_main(script):
    """Each script's ``__main__`` is ``run_main(main)``: the one-line behaviour above, not a copy of it."""
    text = (ROOT / script).read_text()
    assert text.rstrip().endswith('if __name__ == "__main__":\n    run_main(main)'), script
    assert re.search(r"^from ldm\.utils\.task import .*\brun_main\b", text, flags=re.MULTILINE), script


def test_a_benchmark_given_a_damaged_file_is_one_line(tmp_path, capsys):
    bad = DAMAGED["empty"][0](tmp_path / "given.safetensors")
    fidelity = load_script("benchmarks/fidelity.py")
    line = one_error_line(capsys, lambda: run_main(fidelity.main, ["--ckpt", str(bad), "--n", "1"]))
    assert f"{bad} is empty" in line


def test_run_main_leaves_bugs_their_traceback(capsys):
    with pytest.raises(ZeroDivisionError):
        run_main(lambda: 1 / 0)
    assert capsys.readouterr().err == ""


# -- config values -------------------------------------------------------------------------------------------
def _train_error(tmp_path, caplog, overrides: list[str]) -> str:
    cfg = compose_train(tmp_path, [*TINY_VAE, *overrides])
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as stop:
        run_task(train, cfg)
    assert stop.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "trainer.max_steps=abc",
            "trainer.max_steps=abc is not an integer: lightning.pytorch.trainer.Trainer takes max_steps",
        ),
        (
            "model.optimizer.lr=abc",
            "model.optimizer.lr=abc is not a number: torch.optim.Adam takes lr as a number",
        ),
        ("+trainer.detect_anomaly=maybe", "trainer.detect_anomaly=maybe is not true or false"),
    ],
)
def test_config_value_of_the_wrong_type_names_the_key(tmp_path, caplog, override, expected):
    assert expected in _train_error(tmp_path, caplog, [override])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_passes_the_value_check(compose_cfg, experiment):
    from ldm.utils.config_check import check_config_values

    check_config_values(compose_cfg([f"experiment={experiment}"]))  # no false alarm on our own configs


# -- a checkpoint of another architecture --------------------------------------------------------------------
def test_resuming_a_checkpoint_of_another_architecture_is_one_line(embedded_chain, tmp_path, caplog):
    vae_last = next((embedded_chain / "logs" / "vae" / "runs").glob("*/checkpoints/last.ckpt"))
    cfg = compose_train(
        tmp_path,
        [
            "experiment=txt2img",
            "model/vae=tiny",
            "model/unet=tiny",
            "model/text_encoder=tiny",
            "debug=smoke",
            "logger=none",
            "callbacks.rich_progress_bar=null",
            "data.train_size=8",
            "data.val_size=4",
            f"model.vae_ckpt={vae_last}",
            f"ckpt_path={vae_last}",
        ],
    )
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit):
        run_task(train, cfg)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    line = errors[0]
    assert f"ckpt_path={vae_last} does not fit this run: it holds a VAE (autoencoder)" in line, line
    assert "this run builds LatentDiffusion" in line and "unet" in line and len(line) < 1500, line


# -- a full disk, a read-only folder -------------------------------------------------------------------------
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 536576 vs 536468"


@pytest.mark.parametrize(
    "raised",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError(TORCH_FULL_DISK),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
)
def test_full_disk_names_the_file_and_leaves_the_old_one(tmp_path, raised):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous state")

    def write(tmp):
        Path(tmp).write_bytes(b"part")
        raise raised

    with pytest.raises(DiskFullError) as info:
        atomic_write(target, write)
    assert (
        str(info.value).startswith(f"cannot write {target}: the disk is full")
        and info.value.errno == errno.ENOSPC
    )
    assert target.read_bytes() == b"previous state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_full_disk_for_real_on_a_tiny_tmpfs(tmp_path):
    """torch.save and safetensors on a 64 KiB tmpfs (where this machine lets us mount one)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here (the monkeypatched cases above cover the messages)")
    try:
        for write in (
            lambda p: atomic_write(p, lambda tmp: torch.save({"w": torch.zeros(100_000)}, tmp)),
            lambda p: atomic_save_safetensors({"w": torch.zeros(100_000)}, p),
        ):
            with pytest.raises(DiskFullError, match=f"cannot write {folder / 'x'}: the disk is full"):
                write(folder / "x")
            assert list(folder.iterdir()) == []
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_full_disk_during_training_is_one_line(tmp_path, caplog, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"part")
        raise RuntimeError(TORCH_FULL_DISK)

    monkeypatch.setattr(torch, "save", full_disk)
    line = _train_error(tmp_path, caplog, [])
    assert "cannot write " in line and ".ckpt: the disk is full" in line and "unexpected pos" in line, line
    assert not list(tmp_path.rglob("*.tmp"))


def read_only(folder: Path, monkeypatch) -> None:
    """Make ``folder`` read-only; as root (where chmod does not stop writes) refuse temporary files there."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    probe = folder / ".probe"
    try:
        probe.touch()
    except PermissionError:
        return
    probe.unlink()
    folder.chmod(0o755)
    original = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(folder):
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / "tmpXXXX"))
        return original(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def test_read_only_folder_names_the_file(tmp_path, monkeypatch):
    read_only(tmp_path / "ro", monkeypatch)
    with pytest.raises(
        PermissionError, match=f"cannot write {tmp_path / 'ro' / 'a.txt'}: its folder .* is not writable"
    ):
        atomic_write(tmp_path / "ro" / "a.txt", lambda tmp: Path(tmp).write_text("x"))


def test_read_only_run_folder_is_one_line(tmp_path, caplog, monkeypatch):
    import train as train_module

    cfg = compose_train(tmp_path, TINY_VAE)
    cfg.extras.print_config = True  # its first write: config_tree.log, in the run folder
    read_only(Path(cfg.paths.output_dir), monkeypatch)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit):
        train_module.main(cfg)  # hydra.main with a config given calls the task function directly
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "config_tree.log: its folder" in errors[0] and "not writable" in errors[0], (
        errors
    )
