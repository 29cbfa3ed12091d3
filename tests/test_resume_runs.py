"""Resuming picks the right state: ``last.ckpt`` stays the newest state when a run is resumed into its own
folder (no ``last-v1.ckpt``), ``ckpt_path=last`` names the run it continues and refuses when the newest run
has no checkpoint, and a learning rate given at resume applies (the NaN advice works)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.run_checkpoint import RunCheckpoint
from ldm.utils.runs import describe_resume, resolve_ckpt_path
from ldm.utils.task import run_task
from tests.conftest import compose_train
from tests.forked_cli import run_train_forked
from tests.test_checkpoints_reliable import fit_tiny, saved_step
from tests.test_dreambooth import dreambooth_overrides
from tests.test_finetune_lora import base_ckpt  # noqa: F401 - a fixture
from tests.test_resume_exact import QUIET, overrides, run_cli, vae_ckpt  # noqa: F401 - vae_ckpt is a fixture
from train import train


def fit_in(folder: Path, max_steps: int, ckpt_path: str | None = None) -> RunCheckpoint:
    """The tiny regression with validation (and a new best) every 2 steps, checkpoints in ``folder``."""
    return fit_tiny(folder.parent, max_steps, mode="max", dirpath=folder, ckpt_path=ckpt_path)


def test_resume_into_the_same_folder_rewrites_last_ckpt_not_a_versioned_copy(tmp_path):
    """The first checkpoint's last.ckpt is a hard link to the best file, written before last_model_path was
    set: Lightning's version counter then took the resumed run's final state to last-v1.ckpt."""
    folder = tmp_path / "checkpoints"
    fit_in(folder, max_steps=2)  # as a run killed between its first and second checkpoint
    assert saved_step(folder / "last.ckpt") == 2
    checkpoint = fit_in(folder, max_steps=6, ckpt_path=str(folder / "last.ckpt"))
    assert sorted(p.name for p in folder.glob("last*")) == ["last.ckpt"]
    assert saved_step(folder / "last.ckpt") == 6
    assert Path(checkpoint.last_model_path) == folder / "last.ckpt"
    fit_in(folder, max_steps=8, ckpt_path=str(folder / "last.ckpt"))  # and again
    assert sorted(p.name for p in folder.glob("last*")) == ["last.ckpt"]
    assert saved_step(folder / "last.ckpt") == 8


def test_killed_run_resumed_into_its_own_folder_ends_with_last_ckpt_final(tmp_path):
    """The issue's case through train.py: SIGKILL between the first and second checkpoint, then
    ``hydra.run.dir=<that run> ckpt_path=last``: last.ckpt holds the final step, the summary names it, and a
    second ``ckpt_path=last`` finds it (before: last-v1.ckpt got the final state, last.ckpt stayed at step
    2)."""
    args = [*overrides("vae", Path("unused")), "trainer.max_steps=6"]
    killed = run_cli(args, tmp_path / "logs", "SIGKILL", 3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = next((tmp_path / "logs" / "vae" / "runs").iterdir())
    assert saved_step(run / "checkpoints" / "last.ckpt") == 2
    resumed = run_train_forked(
        [*args, f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run}", "ckpt_path=last"]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("last*")) == ["last.ckpt"]
    assert saved_step(run / "checkpoints" / "last.ckpt") == 6
    out = resumed.stdout + resumed.stderr
    assert f"ckpt_path=last: continuing run {run.name} of vae" in out
    assert f"checkpoint: {run / 'checkpoints' / 'last.ckpt'}" in out
    assert resolve_ckpt_path("last", tmp_path / "logs", "vae") == str(run / "checkpoints" / "last.ckpt")


def make_run(log_dir: Path, name: str, age_s: float, with_ckpt: bool, task: str = "vae") -> Path:
    """A run folder of ``task`` last active ``age_s`` seconds ago (a last.ckpt when ``with_ckpt``)."""
    run = log_dir / task / "runs" / name
    (run / ".hydra").mkdir(parents=True)
    (run / "train.log").write_text("")
    stamp = time.time() - age_s
    if with_ckpt:
        (run / "checkpoints").mkdir()
        torch.save({"global_step": 4}, run / "checkpoints" / "last.ckpt")
        os.utime(run / "checkpoints" / "last.ckpt", (stamp, stamp))
    os.utime(run, (stamp - 1, stamp - 1))
    return run


def test_ckpt_path_last_refuses_when_the_newest_run_has_no_checkpoint(tmp_path):
    """The newest run died before its first save: continuing the older, finished run silently is refused,
    with the two ways out named (that run's last.ckpt explicitly, or a fresh start)."""
    finished = make_run(tmp_path, "2025-01-01_10-00-00_aaaaaa", age_s=3600, with_ckpt=True)
    died = make_run(tmp_path, "2025-01-01_11-00-00_bbbbbb", age_s=60, with_ckpt=False)
    with pytest.raises(FileNotFoundError) as refused:
        resolve_ckpt_path("last", tmp_path, "vae")
    message = str(refused.value)
    assert str(died) in message and f"ckpt_path={finished / 'checkpoints' / 'last.ckpt'}" in message
    assert "leave ckpt_path out" in message


def test_ckpt_path_last_names_the_run_it_continues(tmp_path):
    """The current run's own (empty) folder is not "the newest run"; a run resumed into its own folder is.
    (train.py logs the line; test_killed_run_resumed_into_its_own_folder_ends_with_last_ckpt_final reads
    it.)"""
    make_run(tmp_path, "old", age_s=7200, with_ckpt=True)
    newest = make_run(tmp_path, "new", age_s=3600, with_ckpt=True)
    current = make_run(tmp_path, "current", age_s=0, with_ckpt=False)  # Hydra made it for this run
    found = resolve_ckpt_path("last", tmp_path, "vae", current_run=current)
    assert found == str(newest / "checkpoints" / "last.ckpt")
    assert describe_resume(found, "vae").startswith(
        f"ckpt_path=last: continuing run new of vae ({found}, written "
    )
    # hydra.run.dir=<a run>: resumed into itself
    itself = make_run(tmp_path, "itself", age_s=0, with_ckpt=True)
    found = resolve_ckpt_path("last", tmp_path, "vae", current_run=itself)
    assert found == str(itself / "checkpoints" / "last.ckpt")


def test_ckpt_path_last_skips_a_resume_that_saved_nothing(tmp_path):
    """A newest run that was itself a resume (its saved config has a ckpt_path) and saved nothing (it reached
    max_steps at once, or died first) continues what it continued; a fresh run that died is refused."""
    finished = make_run(tmp_path, "finished", age_s=3600, with_ckpt=True)
    resumed = make_run(tmp_path, "resumed", age_s=60, with_ckpt=False)
    (resumed / ".hydra" / "config.yaml").write_text(f"ckpt_path: {finished / 'checkpoints' / 'last.ckpt'}\n")
    assert resolve_ckpt_path("last", tmp_path, "vae") == str(finished / "checkpoints" / "last.ckpt")
    (resumed / ".hydra" / "config.yaml").write_text("ckpt_path: null\n")
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        resolve_ckpt_path("last", tmp_path, "vae")


def test_ckpt_path_last_refusal_is_one_error_line_from_train(tmp_path, caplog, monkeypatch):
    make_run(tmp_path / "logs", "finished", age_s=3600, with_ckpt=True)
    make_run(tmp_path / "logs", "died", age_s=60, with_ckpt=False)
    cfg = compose_train(tmp_path, ["experiment=vae", "model/vae=tiny", "ckpt_path=last"], output_name="now")
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit):
        run_task(train, cfg)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("error: ckpt_path=last: the newest vae run")
    assert "died" in errors[0] and "finished" in errors[0]


class LrProbe(L.Callback):
    """The learning rates in effect at the first training batch of a fit (after any restore)."""

    def __init__(self):
        self.lrs: list[float] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.lrs is None:
            self.lrs = [float(g["lr"]) for g in trainer.optimizers[0].param_groups]


PROBE = ["+callbacks.lr_probe._target_=tests.test_resume_runs.LrProbe"]


def lr_case(experiment: str, base: Path, vae: Path, tmp_path: Path) -> tuple[list[str], str, int]:
    """(overrides of a 2-step run, the lr key to change at resume, the optimiser group it sets)."""
    schedule = ["trainer.max_epochs=-1", "model.scheduler.warmup_steps=0"]
    if experiment == "txt2img":
        return [*overrides("txt2img", vae), *schedule], "model.optimizer.lr", 0
    return (
        [
            *dreambooth_overrides("dreambooth", base, tmp_path),
            *QUIET,
            *schedule,  # per-group: the text encoder
            "model.method.train_text_encoder=true",
            "model.method.text_encoder_lr=5e-5",
        ],
        "model.method.text_encoder_lr",
        1,
    )


def fit_probed(tmp_path: Path, args: list[str], name: str) -> tuple[LrProbe, object]:
    _, objects = train(compose_train(tmp_path, [*args, *PROBE], output_name=name))
    trainer = objects["trainer"]
    return next(c for c in trainer.callbacks if isinstance(c, LrProbe)), trainer


@pytest.mark.parametrize("experiment", ["txt2img", "dreambooth"])
def test_lr_given_at_resume_applies(tmp_path, base_ckpt, vae_ckpt, experiment, caplog):  # noqa: F811
    """What the NaN message advises: resume with a lower lr. The new rate is in effect from the first resumed
    step (the schedule keeps its place); without it the resumed rates are the checkpoint's, untouched."""
    args, key, group = lr_case(experiment, base_ckpt, vae_ckpt, tmp_path)
    _, first = fit_probed(tmp_path, [*args, "trainer.max_steps=2"], "first")
    last = Path(first.checkpoint_callback.dirpath) / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 2
    saved_lrs = [g["lr"] for g in saved["optimizer_states"][0]["param_groups"]]
    old = saved["lr_schedulers"][0]["base_lrs"][group]

    same, _ = fit_probed(tmp_path, [*args, "trainer.max_steps=4", f"ckpt_path={last}"], "same")
    assert same.lrs == saved_lrs  # no override: exactly the checkpoint's (exact resume stays exact)

    new = old / 10
    with caplog.at_level(logging.WARNING):
        lowered, trainer = fit_probed(
            tmp_path, [*args, "trainer.max_steps=4", f"ckpt_path={last}", f"{key}={new}"], "lowered"
        )
    expected = list(saved_lrs)
    expected[group] = saved_lrs[group] * new / old
    assert lowered.lrs == pytest.approx(expected, rel=1e-12)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs[group] == new  # later steps follow the new base
    assert trainer.optimizers[0].param_groups[group]["initial_lr"] == new
    assert any(
        f"resuming with lr {new:g} instead of the checkpoint's {old:g}" in r.getMessage()
        for r in caplog.records
    )
