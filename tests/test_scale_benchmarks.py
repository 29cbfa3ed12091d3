"""The bf16 and savers benchmarks run end to end at test size (benchmarks/bf16_cpu.py,
benchmarks/savers_curve.py)."""

from __future__ import annotations

import json
import sys

from tests.conftest import load_script
from tests.forked_cli import run_train_forked
from tests.test_finetune_lora import base_ckpt  # noqa: F401 (fixture)


def test_bf16_cpu_benchmark_times_every_mode(tmp_path, monkeypatch):
    out = tmp_path / "bf16.json"
    monkeypatch.setattr(sys, "argv", ["bf16_cpu.py", "--cases", "tiny", "--steps", "1", "--json", str(out)])
    load_script("benchmarks/bf16_cpu.py").main()
    row = json.loads(out.read_text())["rows"][0]
    assert set(row["median_s"]) == {"fp32", "bf16-mixed", "bf16-weights"} and all(
        v > 0 for v in row["median_s"].values()
    )
    assert row["ratio_to_fp32"]["fp32"] == 1.0


def test_savers_curve_exact_saver_matches_and_approximate_one_is_compared(
    tmp_path,
    base_ckpt,  # noqa: F811
    monkeypatch,
    capsys,
):
    """The benchmark end to end; its train.py runs are forked from this process (no interpreter start-up)."""
    curve = load_script("benchmarks/savers_curve.py")

    def forked(cmd, env=None, **_):
        assert cmd[1].endswith("train.py"), cmd
        return run_train_forked(cmd[2:], env=env)

    monkeypatch.setattr(curve.subprocess, "run", forked)
    out = tmp_path / "curve.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "savers_curve.py",
            "--base",
            str(base_ckpt),
            "--steps",
            "3",
            "--batch",
            "4",
            "--window",
            "2",
            "--variants",
            "baseline",
            "+in_backward",
            "+bf16_weights",
            "--json",
            str(out),
        ],
    )
    curve.main()
    table = {row["variant"]: row for row in json.loads(out.read_text())["table"]}
    assert table["baseline"]["steps"] == 3 and table["baseline"]["val_loss"] > 0
    assert table["+in_backward"]["max_step_diff"] < 1e-6  # exact: the same curve
    assert table["+bf16_weights"]["max_step_diff"] > 0  # approximate: measured, not assumed
    assert "| +bf16_weights |" in capsys.readouterr().out
