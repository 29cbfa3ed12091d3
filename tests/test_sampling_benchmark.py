"""benchmarks/sampling.py runs (both parts, shortened): the commands in the README's sampling section."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.test_sample_cli import single_file  # noqa: F401  (fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytest.importorskip("diffusers")


def test_speed_part_compares_with_diffusers():
    from benchmarks.sampling import main

    rows = main(
        [
            "--part",
            "speed",
            "--samplers",
            "ddim,dpmpp_2m_karras,dpmpp_2s_a",
            "--batch",
            "1",
            "--steps",
            "2",
            "--repeats",
            "1",
        ]
    )["speed"]
    assert [r[0] for r in rows] == ["ddim", "dpmpp_2m_karras", "dpmpp_2s_a"]
    assert rows[0][1] == "DDIMScheduler" and rows[0][2] > 0 and rows[0][3] > 0
    assert rows[2][1] is None and rows[2][3] is None  # no diffusers counterpart: ours only


def test_fidelity_part_scores_every_sampler_and_step_count(single_file):  # noqa: F811
    from benchmarks.sampling import main

    results = main(
        [
            "--part",
            "fidelity",
            "--ckpt",
            str(single_file),
            "--samplers",
            "euler,dpmpp_2m",
            "--n",
            "2",
            "--fidelity-steps",
            "1,2",
        ]
    )["fidelity"]
    assert set(results) == {("euler", 1), ("euler", 2), ("dpmpp_2m", 1), ("dpmpp_2m", 2)}
    assert all(0.0 <= value <= 1.0 for value in results.values())
