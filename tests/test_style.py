"""The code style CI keeps: the tree is ``ruff format``-ed, and ``ruff check`` (its default rules plus E501,
the declared line length of pyproject.toml) finds nothing. The suite is what CI runs, so these two checks
are how a misformatted file or an over-long line fails CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    # --no-cache: nothing written into the checkout, no cache shared between parallel test workers
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", "."],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args",
    [("format", "--check"), ("check",)],
    ids=["ruff-format", "ruff-check"],
)
def test_ruff_finds_nothing(args):
    result = ruff(*args)
    assert result.returncode == 0, (
        f"`ruff {' '.join(args)} .` exited with {result.returncode} (run `ruff format .` / fix the lines):\n"
        f"{result.stdout}{result.stderr}"
    )


def test_line_length_is_checked():
    """E501 is on, at the declared 110 characters: a 111-character line is reported, a 110 one is not."""
    long_line, ok_line = "x = " + '"' + "a" * 105 + '"\n', "x = " + '"' + "a" * 104 + '"\n'
    assert len(long_line) - 1 == 111 and len(ok_line) - 1 == 110
    for text, expected in ((long_line, 1), (ok_line, 0)):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", "--stdin-filename", "ldm/probe.py", "-"],
            cwd=ROOT,
            check=False,
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == expected, result.stdout + result.stderr
        assert ("E501" in result.stdout) == bool(expected), result.stdout
