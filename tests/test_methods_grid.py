"""benchmarks/methods.py end to end at test size: a tiny txt2img base, a star arm scored at every export
(``adamw``) and a subject arm (``textual_inversion``), with a tiny CLIP; a CSV row per run with numbers in
range; a partial run continues from its checkpoint; a finished grid trains and scores nothing; a killed run
resumes; ``--collect`` writes the tables; the rank agreement and the peak-memory reading on their own."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.modules.vae import AutoencoderKL
from tests.conftest import load_script
from tests.forked_cli import run_train_forked
from tests.metric_models import save_clip


class Finished:
    """What ``launch`` returns (a Popen) for a run that already ended (no pid: no resource usage)."""

    def __init__(self, code: int):
        self.returncode = code

    def poll(self) -> int:
        return self.returncode


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from tests.conftest import compose_train
    from train import train

    tmp = tmp_path_factory.mktemp("base")
    vae = AutoencoderKL(embed_dim=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32, norm_groups=4)
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, tmp / "vae.ckpt")
    cfg = compose_train(
        tmp,
        [
            "experiment=txt2img",
            "model/vae=tiny",
            "model/unet=tiny",
            "model/text_encoder=tiny",
            "callbacks.rich_progress_bar=null",
            "debug=smoke",
            "data.train_size=16",
            "data.val_size=4",
            f"model.vae_ckpt={tmp / 'vae.ckpt'}",
        ],
    )
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def test_methods_grid_scores_resumes_skips_and_collects(tiny_base, tmp_path, monkeypatch):
    grid = load_script("benchmarks/methods.py")
    launches = []

    def forked(argv, log, nice, threads=1):  # train.py forked from this process: no interpreter start-up
        launches.append(argv)
        result = run_train_forked(argv, env=grid.CHILD_ENV)
        log.write_text(result.stdout + result.stderr)
        return Finished(result.returncode)

    monkeypatch.setattr(grid, "launch", forked)
    out = tmp_path / "out"
    argv = [
        "--base",
        str(tiny_base),
        "--out",
        str(out),
        "--arms",
        "adamw,textual_inversion",
        "--seeds",
        "0",
        "--every",
        "2",
        "--ckpt-every",
        "2",
        "--n",
        "3",
        "--curve-n",
        "2",
        "--sampler-steps",
        "2",
        "--nice",
        "0",
        "--poll",
        "0.1",
        "--clip",
        str(save_clip(tmp_path / "clip")),
        "--override",
        "debug=smoke",
        "--override",
        "trainer.max_epochs=-1",  # smoke's one epoch is one step of the 6 named-object images
        "--override",
        f"data.cache_dir={tmp_path / 'cache'}",
        *("--override", "lora:data.source.train_size=8", "--override", "lora:data.regularization_size=4"),
    ]
    first = grid.main([*argv, "--max-steps", "2"])
    assert first["failed"] == [] and first["launched"] == 2
    assert [a for a in launches[0] if a.startswith(("experiment=", "data.source"))] == [
        "experiment=lora_finetune",
        "data.source.train_size=8",
    ]
    assert not any(a.startswith("data.source") for a in launches[1])  # the lora: override is the LoRA run's
    assert "experiment=textual_inversion" in launches[1]

    # the budget raised: both runs continue from their step-2 checkpoint, every export scored once
    launches.clear()
    second = grid.main([*argv, "--max-steps", "4"])
    assert second["launched"] == 2 and all(a[-1].startswith("ckpt_path=") for a in launches)
    rows = {(r["run"], r["step"]): r for r in csv.DictReader((out / "methods.csv").open())}
    assert set(rows) == {("lora", "2"), ("lora", "4"), ("textual_inversion", "2"), ("textual_inversion", "4")}
    star, subject = rows[("lora", "4")], rows[("textual_inversion", "4")]
    for row in (star, subject):
        assert 0.0 <= float(row["exact"]) <= 1.0 and row["n"] == "3"
        assert -1.0 <= float(row["clip_t"]) <= 1.0 and -1.0 <= float(row["clip_i"]) <= 1.0
        assert float(row["file_kib"]) > 0
    assert float(star["params"]) > 1000 and float(star["s_per_step"]) > 0  # a LoRA file, exports at 2 and 4
    assert 0.0 <= float(star["known_fidelity"]) <= 1.0 and 0.0 <= float(star["base_known_fidelity"]) <= 1.0
    assert 0.0 <= float(subject["background_acc"]) <= 1.0
    assert 0.0 <= float(subject["class_fidelity"]) <= 1.0 and subject["base_class_fidelity"] != ""
    curve = [(r["run"], r["step"]) for r in csv.DictReader((out / "methods_curves.csv").open())]
    assert curve == [("lora", "2"), ("lora", "4")]  # only the curve arm's exports

    # the same command again: nothing trained, nothing scored
    launches.clear()
    before = (out / "methods.csv").read_text(), (out / "methods_curves.csv").read_text()
    third = grid.main([*argv, "--max-steps", "4"])
    assert third["launched"] == 0 and launches == []
    assert ((out / "methods.csv").read_text(), (out / "methods_curves.csv").read_text()) == before

    # a run killed before it finished (no done.json): resumed from its newest checkpoint, not retrained
    run = out / "runs" / "textual_inversion_s0"
    (run / "done.json").unlink()
    grid.main([*argv, "--max-steps", "4"])
    assert len(launches) == 1 and launches[0][-1].startswith("ckpt_path=")
    assert torch.load(launches[0][-1].split("=", 1)[1], weights_only=True, mmap=True)["global_step"] == 4
    assert json.loads((run / "done.json").read_text())["steps"] == 4

    # --collect: the tables from the CSVs alone
    (out / "methods.md").unlink()
    table = grid.main(["--out", str(out), "--arms", "adamw,textual_inversion", "--seeds", "0", "--collect"])[
        "table"
    ]
    assert (out / "methods.md").read_text() in table + "\n"
    assert (
        "| adamw | = lora, lr 1e-3 | 1 | 4 |" in table
        and "| textual_inversion | named object <gem> | 1 | 4 |" in table
    )
    assert "steps to 70% star fidelity" in table


def test_rank_agreement_and_arms():
    tables = load_script("benchmarks/grid/method_tables.py")
    rows = [{"exact": str(e), "clip_i": str(c)} for e, c in [(0.1, 0.2), (0.5, 0.3), (0.9, 0.8), (0.7, 0.4)]]
    assert tables.spearman(rows, "clip_i") == (pytest.approx(1.0), 4)
    flipped = [{**r, "clip_i": str(-float(r["clip_i"]))} for r in rows]
    assert tables.spearman(flipped, "clip_i")[0] == pytest.approx(-1.0)
    assert tables.spearman(rows[:2], "clip_i") == (None, 2)  # too few runs to rank
    constant = [{**r, "clip_t": "0.0"} for r in rows]  # CLIPScore clips a negative mean to 0
    assert tables.spearman(constant, "clip_t") == (None, 4)

    grid = load_script("benchmarks/methods.py")
    args = grid.parse_args(["--arms", "issue23", "--collect"])
    assert args.arms[:5] == ["lora", "locon", "loha", "lokr", "dora"] and "prodigy" in args.arms
    assert grid.run_overrides(["a=1", "lora:b=2", "prodigy:c=3"], "lora") == ["a=1", "b=2"]
    assert grid.run_overrides(["a=1", "lora_star:b=2"], "lora") == ["a=1", "b=2"]  # lora_star trains "lora"
    with pytest.raises(SystemExit):
        grid.parse_args(["--arms", "lora,nope", "--collect"])


def test_peak_memory_of_a_child_process():
    grid = load_script("benchmarks/methods.py")
    proc = subprocess.Popen(
        [sys.executable, "-c", "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096])"]
    )
    for _ in range(600):
        code, peak = grid.wait_child(proc)
        if code is not None:
            break
        import time

        time.sleep(0.05)
    assert code == 0 and peak > 300


def test_captions_without_the_background_score_the_copied_background():
    """The masked-loss demo's measure: instance captions "a sks square" on one background; the caption as
    trained is scored for the subject and for how often the instance background comes back."""
    from datamodules.dreambooth import Concept
    from datamodules.shapes import Subject, render_subject
    from datamodules.shapes_evaluator import ShapesEvaluator

    fidelity = load_script("benchmarks/subject_fidelity.py")
    one = {"identifier": "sks", "subject": Subject(), "instance_backgrounds": ["blue"]}
    bare = Concept.from_config({**one, "instance_prompt": "a {identifier} {class_noun}"})
    assert fidelity.instance_prompts(bare, 3) == ["a sks square"] * 3
    assert fidelity.instance_prompts(Concept.from_config(one), 3) == []  # captions name the background
    images = [render_subject(Subject(), bg, 32, None) for bg in ("blue", "blue", "blue", "red")]
    images = torch.stack([torch.from_numpy(i).permute(2, 0, 1).float() / 127.5 - 1 for i in images])
    row = fidelity.score_images(ShapesEvaluator(), bare, "instance", images, ["a sks square"] * 4)
    assert row["instance_background"] == 0.75 and row["subject_rate"] == 1.0
    assert row["background_acc"] is None and row["fidelity"] is None

    tables = load_script("benchmarks/grid/method_tables.py")
    grid = load_script("benchmarks/methods.py")
    rows = [
        {"run": run, "seed": "0", "step": "1000", "subject_subject_rate": "0.1", "background_acc": "1.0"}
        | {"instance_subject_rate": s, "base_instance_subject_rate": "0.0"}
        | {"instance_background": b, "base_instance_background": "0.25"}
        for run, s, b in (("masked_1bg", "0.75", "0.2"), ("unmasked_1bg", "1.0", "1.0"))
    ]
    args = grid.parse_args(["--arms", "masked_1bg,unmasked_1bg,masked", "--collect"])
    table = tables.instance_table(args, grid.ARMS, type("R", (), {"rows": rows})())
    assert "| masked_1bg | one background, captions without it, masked | 1 | 75.0% (base 0.0%) " in table
    assert "| 20.0% (base 25.0%) | 10.0% | 100.0% |" in table and "| unmasked_1bg |" in table
    assert "| masked |" not in table  # its captions name the background: nothing to copy
    # the subject table names per-concept rates only for runs that have them (CSV rows carry every column)
    two = {"run": "two_concepts", "seed": "0", "step": "1000", "subject_subject_rate": "0.5"}
    rows = [{**r, "subject_rate_zwx": "", "subject_rate_qwe": ""} for r in rows]
    rows.append({**rows[0], **two, "subject_rate_zwx": "0.6", "subject_rate_qwe": "0.4"})
    args = grid.parse_args(["--arms", "masked_1bg,two_concepts", "--collect"])
    table = tables.subject_table(args, grid.ARMS, type("R", (), {"rows": rows})())
    assert "| 10.0% |" in table and "(qwe 40.0%, zwx 60.0%)" in table and "(qwe -" not in table
