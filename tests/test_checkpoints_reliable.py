"""Checkpoint files: last.ckpt is the final state, NaN never becomes best/last, saves are atomic, run
folders never collide, resume refuses malicious pickles and names damaged files, SIGTERM/SIGUSR1 save."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from callbacks.run_checkpoint import RunCheckpoint
from ldm.io.file_checks import DamagedFileError
from ldm.io.safe_load import UnsafeCheckpointError
from ldm.models.safe_checkpoint_io import SafeCheckpointIO
from tests.conftest import CONF, ROOT, compose_train, load_script
from tests.test_resume_exact import final_weights, max_difference, run_cli, uninterrupted_vae  # noqa: F401
from train import train


class TinyRegression(L.LightningModule):
    """y = w x; ``val/loss`` is NaN at the validation steps listed in ``nan_at``."""

    def __init__(self, nan_at: tuple[int, ...] = ()):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.nan_at = set(nan_at)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        value = float("nan") if self.global_step in self.nan_at else float(self.global_step)
        self.log("val/loss", torch.tensor(value))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_tiny(
    tmp_path: Path,
    max_steps: int,
    nan_at=(),
    checkpoint_cls=RunCheckpoint,
    *,
    mode: str = "min",
    dirpath: Path | None = None,
    ckpt_path: str | None = None,
) -> RunCheckpoint:
    """The tiny regression, validated (``val/loss`` = the step) every 2 steps; checkpoints in ``dirpath``
    (default ``tmp_path/ckpt``); ``ckpt_path``: resume from it."""
    data = TensorDataset(torch.randn(32, 2), torch.randn(32, 1))
    checkpoint = checkpoint_cls(
        dirpath=dirpath or tmp_path / "ckpt",
        filename="step_{step}",
        monitor="val/loss",
        auto_insert_metric_name=False,
        mode=mode,
        save_last=True,
        save_top_k=1,
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
        plugins=[SafeCheckpointIO()],
    )
    resume = {"ckpt_path": ckpt_path, "weights_only": True} if ckpt_path else {}
    loaders = DataLoader(data, batch_size=4), DataLoader(data, batch_size=4)
    trainer.fit(TinyRegression(nan_at), *loaders, **resume)
    return checkpoint


def saved_step(path: str | Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


class WorseEachTime(TinyRegression):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(float(self.global_step)))  # never improves after the first


def test_last_ckpt_is_the_final_state(tmp_path):
    checkpoint = fit_tiny(tmp_path, max_steps=5)  # validation (and saving) at 2 and 4, training ends at 5
    assert saved_step(tmp_path / "ckpt" / "last.ckpt") == 5
    assert checkpoint.last_model_path.endswith("last.ckpt")


def test_last_ckpt_follows_every_validation_not_only_new_bests(tmp_path, monkeypatch):
    monkeypatch.setattr(TinyRegression, "validation_step", WorseEachTime.validation_step)
    steps = []

    class Record(L.Callback):
        def on_validation_start(self, trainer, pl_module):  # what the previous validation left
            last = tmp_path / "ckpt" / "last.ckpt"
            steps.append(saved_step(last) if last.is_file() else None)

    original = L.Trainer.__init__
    monkeypatch.setattr(
        L.Trainer,
        "__init__",
        lambda self, *a, callbacks=(), **k: original(self, *a, callbacks=[*callbacks, Record()], **k),
    )
    checkpoint = fit_tiny(tmp_path, max_steps=6)
    assert steps == [None, 2, 4]  # best stays at step 2, last moves on
    assert saved_step(tmp_path / "ckpt" / "last.ckpt") == 6
    assert saved_step(checkpoint.best_model_path) == 2


class BetterEachTime(TinyRegression):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(-float(self.global_step)))  # a new best at every validation


def test_last_ckpt_is_a_hard_link_to_the_best_saved_at_the_same_step(tmp_path, monkeypatch):
    """The same state is not written twice: last.ckpt links to the new best; removing that file (a newer best
    replaces it) leaves last.ckpt whole."""
    monkeypatch.setattr(TinyRegression, "validation_step", BetterEachTime.validation_step)
    written = []
    save = SafeCheckpointIO.save_checkpoint
    monkeypatch.setattr(
        SafeCheckpointIO,
        "save_checkpoint",
        lambda self, state, path, **k: (written.append(Path(path).name), save(self, state, path, **k)),
    )
    fit_tiny(tmp_path, max_steps=4)  # validation at 2 and 4, each a new best
    folder = tmp_path / "ckpt"
    assert written == ["step_2.ckpt", "step_4.ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step_4.ckpt"]  # step_2 removed
    assert os.path.samefile(folder / "last.ckpt", folder / "step_4.ckpt")
    (folder / "step_4.ckpt").unlink()
    assert saved_step(folder / "last.ckpt") == 4


def test_nan_validation_loss_never_becomes_best_or_last(tmp_path):
    checkpoint = fit_tiny(tmp_path, max_steps=6, nan_at=(4, 6))
    assert saved_step(checkpoint.best_model_path) == 2
    assert math.isfinite(float(checkpoint.best_model_score))
    assert saved_step(tmp_path / "ckpt" / "last.ckpt") == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt", "step_2.ckpt"]

    # the first validation is NaN: Lightning's ModelCheckpoint would save that state as best and last
    checkpoint = fit_tiny(tmp_path / "first", max_steps=3, nan_at=(2,))
    assert not checkpoint.best_model_path and not (tmp_path / "first" / "ckpt").exists()


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies mid-write leaves the previous file intact and no temporary file behind."""
    target = tmp_path / "last.ckpt"
    io = SafeCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)

    def dies_halfway(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)


def test_run_folders_get_a_unique_suffix():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train.yaml", return_hydra_config=True)
    GlobalHydra.instance().clear()
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]
    assert re.search(r"/runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_[0-9a-f]{6}$", run_dir), run_dir
    code = "import ldm.utils.runs as r; print(r.run_suffix())"
    suffixes = {
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(suffixes) == 2  # two processes started in the same second still get different folders


# --- resume safety ----------------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.ones(1)}, "global_step": 1, "evil": _RunsCode(str(marker))}, path)
    return path


TINY_VAE = [
    "experiment=vae",
    "model/vae=tiny",
    "debug=smoke",
    "data.train_size=8",
    "data.val_size=4",
    "data.batch_size=4",
    "callbacks.rich_progress_bar=null",
    "logger=none",
    "callbacks.lr_monitor=null",
]


def test_malicious_pickle_as_ckpt_path_never_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned.txt"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    cfg = compose_train(tmp_path, [*TINY_VAE, f"ckpt_path={evil}"])
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt.*arbitrary code"):
        train(cfg)
    assert not marker.exists()


def test_malicious_pickle_as_vae_ckpt_is_refused_with_our_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned.txt"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    cfg = compose_train(
        tmp_path,
        [
            "experiment=txt2img",
            "model/vae=tiny",
            "model/unet=tiny",
            "model/text_encoder=tiny",
            "debug=smoke",
            "data.train_size=8",
            "data.val_size=4",
            f"model.vae_ckpt={evil}",
            "callbacks.rich_progress_bar=null",
            "logger=none",
        ],
    )
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.ckpt"):
        train(cfg)
    assert not marker.exists()


def _entry_points(evil: Path, tmp_path: Path) -> dict:
    from ldm.models import pipeline
    from ldm.models.checkpoint import load_lightning_model

    convert = load_script("scripts/convert.py")
    finetune = compose_train(
        tmp_path,
        [
            "experiment=lora_finetune",
            "debug=smoke",
            f"model.base={evil}",
            "data.cache_dir=null",
            "logger=none",
            "callbacks.lr_monitor=null",
            "callbacks.rich_progress_bar=null",
        ],
        output_name="ft",
    )
    return {
        "sample.py --ckpt": lambda: pipeline.load_for_sampling(str(evil)),
        "scripts/convert.py --base": lambda: convert.main(
            ["--base", str(evil), "--out", str(tmp_path / "o.safetensors")]
        ),
        "load_lightning_model": lambda: load_lightning_model(evil),
        "train.py model.base": lambda: train(finetune),
    }


def test_malicious_pickle_never_runs_through_any_entry_point(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned.txt"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    for name, run in _entry_points(evil, tmp_path).items():
        with pytest.raises((UnsafeCheckpointError, SystemExit, ValueError)) as caught:
            run()
        assert "arbitrary code" in str(caught.value) or "refusing" in str(caught.value), (name, caught.value)
        assert not marker.exists(), name


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"hello, I am a text file\n", "is a text file"),
        (b"", "is empty"),
    ],
)
def test_foreign_file_as_ckpt_path_is_named(tmp_path, content, expected):
    bad = tmp_path / "notes.ckpt"
    bad.write_bytes(content)
    cfg = compose_train(tmp_path, [*TINY_VAE, f"ckpt_path={bad}"])
    with pytest.raises(DamagedFileError, match=f"notes.ckpt {expected}"):
        train(cfg)


def test_truncated_last_ckpt_is_named(tmp_path):
    cfg = compose_train(tmp_path, TINY_VAE, output_name="first")
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    resumed = compose_train(
        tmp_path, [*TINY_VAE, "ckpt_path=last", "trainer.max_steps=6"], output_name="second"
    )
    with pytest.raises(DamagedFileError, match=r"last.ckpt is damaged or truncated"):
        train(resumed)


# --- preemption -------------------------------------------------------------------------------------------


def _stop_with(signal_name: str, tmp_path: Path) -> tuple[list[str], Path]:
    from tests.test_resume_exact import overrides

    args = overrides("vae", tmp_path)
    stopped = run_cli(args, tmp_path / "logs", signal_name, step=6)  # arrives during step 7 (no validation)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]  # stopped, not finished
    last = next((tmp_path / "logs").glob("*/runs/*/checkpoints/last.ckpt"))
    assert saved_step(last) == 7
    return args, last


def test_sigterm_saves_last_ckpt_that_resumes_exactly(tmp_path, uninterrupted_vae):  # noqa: F811 - pytest fixture
    args, _ = _stop_with("SIGTERM", tmp_path)
    resumed = final_weights(tmp_path, [*args, "ckpt_path=last"], "resumed")
    assert max_difference(resumed, uninterrupted_vae) == 0.0


def test_sigusr1_saves_last_ckpt_and_stops(tmp_path):
    _stop_with("SIGUSR1", tmp_path)


def test_slurm_auto_requeue_keeps_sigusr1_for_lightning():
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    checkpoint = RunCheckpoint()
    plain = SimpleNamespace(strategy=SimpleNamespace(cluster_environment=LightningEnvironment()))
    slurm = SimpleNamespace(strategy=SimpleNamespace(cluster_environment=SLURMEnvironment(auto_requeue=True)))
    no_requeue = SimpleNamespace(
        strategy=SimpleNamespace(cluster_environment=SLURMEnvironment(auto_requeue=False))
    )
    assert checkpoint.forwarded_signals(plain) == [signal.SIGUSR1]
    assert checkpoint.forwarded_signals(slurm) == []  # Lightning saves hpc_ckpt and requeues
    assert checkpoint.forwarded_signals(no_requeue) == [signal.SIGUSR1]
