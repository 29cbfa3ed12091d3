"""benchmarks/convergence.py end to end at test size: VAE, two objective options x one seed, every checkpoint
scored into one CSV, the plot drawn; a second run trains and scores nothing; a killed run resumes."""

from __future__ import annotations

import csv
import json
import shutil

from PIL import Image

from tests.conftest import load_script
from tests.forked_cli import run_train_forked

TINY = ["debug=smoke", "model/vae=tiny", "data.train_size=16", "data.val_size=4"]


class Finished:
    """What ``launch`` returns (a Popen) for a run that already ended."""

    def __init__(self, code: int):
        self.returncode = code

    def poll(self) -> int:
        return self.returncode

    def wait(self) -> int:
        return self.returncode

    def send_signal(self, signum) -> None:
        pass


def test_grid_scores_every_checkpoint_skips_finished_runs_and_resumes(tmp_path, monkeypatch):
    conv = load_script("benchmarks/convergence.py")
    launches = []

    def forked(argv, log, nice, threads=1):  # train.py forked from this process: no interpreter start-up
        launches.append(argv)
        result = run_train_forked(argv, env=conv.CHILD_ENV)
        log.write_text(result.stdout + result.stderr)
        return Finished(result.returncode)

    monkeypatch.setattr(conv, "launch", forked)
    out, png = tmp_path / "out", tmp_path / "docs" / "convergence.png"
    argv = [
        "--out",
        str(out),
        "--png",
        str(png),
        "--options",
        "eps,v+minsnr5",
        "--seeds",
        "0",
        "--steps",
        "4",
        "--every",
        "2",
        "--round",
        "2",
        "--batch",
        "4",
        "--n",
        "4",
        "--val-n",
        "8",
        "--brightness-n",
        "4",
        "--brightness-every",
        "4",
        "--sampler-steps",
        "2",
        "--nice",
        "0",
        "--poll",
        "0.1",
        "--vae-steps",
        "2",
        *[a for o in TINY for a in ("--vae-override", o)],
        *[a for o in [*TINY, "model/unet=tiny"] for a in ("--override", o)],
    ]
    first = conv.main(argv)

    assert [a for a in launches[0] if a.startswith("experiment=")] == ["experiment=vae"]
    # two rounds: both runs to step 2, then both on to step 4 from their last.ckpt, the schedule 4 steps long
    assert first["launched"] == 4 and len(launches) == 5
    assert "model/loss=v_min_snr" in launches[2]
    assert [next(a for a in argv if a.startswith("trainer.max_steps=")) for argv in launches[1:]] == [
        "trainer.max_steps=2",
        "trainer.max_steps=2",
        "trainer.max_steps=4",
        "trainer.max_steps=4",
    ]
    assert all("model.scheduler.total_steps=4" in argv for argv in launches[1:])
    assert [argv[-1].startswith("ckpt_path=") for argv in launches[1:]] == [False, False, True, True]
    rows = list(csv.DictReader((out / "convergence.csv").open()))
    assert [(r["option"], r["seed"], r["step"]) for r in rows] == [
        ("eps", "0", "2"),
        ("eps", "0", "4"),
        ("v+minsnr5", "0", "2"),
        ("v+minsnr5", "0", "4"),
    ]
    for row in rows:
        assert 0.0 <= float(row["fidelity"]) <= 1.0 and row["n"] == "4"
        losses = [float(row[f"val_{kind}_t{t}"]) for kind in ("eps", "x0") for t in (0, 250, 500, 750)]
        assert all(v > 0 for v in losses)
    # the brightness claim is scored every --brightness-every steps only
    assert [r["black_match"] != "" for r in rows] == [False, True, False, True]
    assert 0.0 <= float(rows[1]["white_match"]) <= 1.0 and float(rows[1]["black_real_mean"]) < 100
    with Image.open(png) as image:
        assert image.size == (1100, 600)
    assert "| eps | not reached by 4 | s0: not by 4 | 4 (1 seed) |" in first["table"]
    assert (out / "convergence.md").read_text() in first["table"] + "\n"

    # the same command again: everything is done, nothing is trained or scored
    launches.clear()
    second = conv.main(argv)
    assert second["launched"] == 0 and launches == [] and len(second["rows"]) == 4

    # a run killed after its first checkpoint was scored: resumed from last.ckpt, only the rest scored
    run = out / "runs" / "v+minsnr5_s0"
    (run / "done.json").unlink()
    for path in (run / "checkpoints").glob("*.ckpt"):  # step_000004, last.ckpt, last-v1.ckpt (round 2's last)
        if path.name != "step_000002.ckpt":
            path.unlink()
    shutil.copyfile(run / "checkpoints" / "step_000002.ckpt", run / "checkpoints" / "last.ckpt")
    (out / "convergence.csv").write_text("".join((out / "convergence.csv").read_text().splitlines(True)[:4]))
    third = conv.main(argv)
    assert third["launched"] == 1 and f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in launches[0]
    assert [(r["option"], r["step"]) for r in third["rows"]][-1] == ("v+minsnr5", "4") and len(
        third["rows"]
    ) == 4
    assert (run / "checkpoints" / "step_000004.ckpt").is_file()

    # a run whose last two checkpoints already reached the target is done without training, even with more
    # steps to go
    launches.clear()
    (run / "done.json").unlink()
    conv.main([*argv, "--target", "0.0", "--options", "v+minsnr5", "--steps", "6"])
    assert launches == [] and json.loads((run / "done.json").read_text())["reason"] == "target"


def test_grid_order_seed_first_or_round_by_round(tmp_path):
    """``--order seed`` takes seed 0 of every option to the end before seed 1; ``--order round`` first brings
    every run to the end of the current round."""
    conv = load_script("benchmarks/convergence.py")
    orders = {}
    for order in ("seed", "round"):
        args = conv.parse_args(
            [
                "--out",
                str(tmp_path / order),
                "--options",
                "eps,v",
                "--seeds",
                "0,1",
                "--steps",
                "4",
                "--round",
                "2",
                "--order",
                order,
            ]
        )
        grid = conv.Grid(args, tmp_path / "vae.ckpt", conv.Results(tmp_path / order / "c.csv"), scorer=None)
        for option in ("eps", "v"):  # seed 0 of both options trained to step 2
            grid.run_dir((option, 0)).mkdir(parents=True)
            grid.mark_done((option, 0), 2, "round")
        orders[order] = grid.waiting()
    assert orders["seed"] == [(4, ("eps", 0)), (4, ("v", 0)), (2, ("eps", 1)), (2, ("v", 1))]
    assert orders["round"] == [(2, ("eps", 1)), (2, ("v", 1)), (4, ("eps", 0)), (4, ("v", 0))]


def test_resume_takes_the_checkpoint_with_the_highest_step_not_last_ckpt_by_name(tmp_path):
    """A run resumed from a last.ckpt linked to its first checkpoint writes last-v1.ckpt (Lightning's version
    counter); resuming from last.ckpt by name would go back to that first state."""
    import os

    import torch

    conv = load_script("benchmarks/convergence.py")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for i, (name, step) in enumerate(
        [
            ("step_000250.ckpt", 250),
            ("last.ckpt", 250),
            ("step_000500.ckpt", 500),
            ("last-v1.ckpt", 500),
            ("step_000500-v1.ckpt", 500),
            ("last-v2.ckpt", 380),
        ]
    ):
        torch.save({"global_step": step}, folder / name)
        os.utime(
            folder / name, (1000 + i, 1000 + i)
        )  # last-v2 (a stale run stopped by a signal) is the newest
    assert conv.resume_override(tmp_path) == [f"ckpt_path={folder / 'step_000500-v1.ckpt'}"]
    assert [step for step, _ in conv.checkpoints(tmp_path)] == [250, 500]  # the -v1 copy of a step is skipped


def test_each_option_names_its_whole_objective_whatever_txt2img_defaults_to(compose_cfg):
    """The grid's options must mean what their names say even after experiment=txt2img's default objective
    changed (it is v + Min-SNR-5 now): "eps" is plain eps, not the experiment's default."""
    conv = load_script("benchmarks/convergence.py")
    expected = {
        "eps": ("eps", None, 0.0),
        "eps+minsnr5": ("eps", 5.0, 0.0),
        "v": ("v", None, 0.0),
        "v+minsnr5": ("v", 5.0, 0.0),
        "eps+offset0.05": ("eps", None, 0.05),
    }
    assert set(conv.OPTIONS) == set(expected)
    for option, want in expected.items():
        model = compose_cfg(["experiment=txt2img", "model/text_encoder=tiny", *conv.OPTIONS[option]]).model
        assert (model.parameterization, model.min_snr_gamma, model.offset_noise) == want, option
