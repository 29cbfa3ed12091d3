"""The bf16 and savers benchmarks run end to end at test size (benchmarks/bf16_cpu.py, benchmarks/savers_curve.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT
from tests.test_finetune_lora import base_ckpt  # noqa: F401 (fixture)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def test_bf16_cpu_benchmark_times_every_mode(tmp_path):
    out = tmp_path / "bf16.json"
    cmd = [sys.executable, "benchmarks/bf16_cpu.py", "--cases", "tiny", "--steps", "1", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(out.read_text())["rows"][0]
    assert set(row["median_s"]) == {"fp32", "bf16-mixed", "bf16-weights"} and all(v > 0 for v in row["median_s"].values())
    assert row["ratio_to_fp32"]["fp32"] == 1.0


def test_savers_curve_exact_saver_matches_and_approximate_one_is_compared(tmp_path, base_ckpt):  # noqa: F811
    out = tmp_path / "curve.json"
    cmd = [sys.executable, "benchmarks/savers_curve.py", "--base", str(base_ckpt), "--steps", "3", "--batch", "4",
           "--window", "2", "--variants", "baseline", "+in_backward", "+bf16_weights", "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    table = {row["variant"]: row for row in json.loads(out.read_text())["table"]}
    assert table["baseline"]["steps"] == 3 and table["baseline"]["val_loss"] > 0
    assert table["+in_backward"]["max_step_diff"] < 1e-6  # exact: the same curve
    assert table["+bf16_weights"]["max_step_diff"] > 0  # approximate: measured, not assumed
    assert "| +bf16_weights |" in result.stdout
