"""``python train.py <args>`` as a separate process without the interpreter start-up: a fork of the test
process (torch, Lightning and Hydra already imported) runs train.py's Hydra entry point with ``sys.argv``
set as the shell would set it. The child is a real process: a signal it sends itself (SIGKILL, SIGTERM,
SIGUSR1) ends it as it would end ``python train.py``, and only what it wrote to disk survives. Saves 5-7 s of
imports per run (tests/test_resume_*.py run one each)."""

from __future__ import annotations

import io
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(argv: list[str], env: dict[str, str], cwd: Path, out, err) -> int:
    """Runs in the forked process; returns its exit status."""
    os.setpgid(0, 0)  # its own process group: a group signal sent by the run cannot reach pytest
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
    os.environ.update(env)
    os.chdir(cwd)
    try:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()  # a test may have composed a config in this process before the fork
        sys.argv = [str(ROOT / "train.py"), *argv]
        runpy.run_path(sys.argv[0], run_name="__main__")  # as `python train.py`: imports are already loaded
        return 0
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - the parent reads the traceback from stderr
        traceback.print_exc()
        return 1


def run_train_forked(
    argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Like ``subprocess.run([python, "train.py", *argv])``: returncode (negative signal number when a signal
    ended it), stdout and stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                status = _child(argv, env or {}, cwd, out, err)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(status)
        code = _wait(pid, timeout, argv)
        texts = []
        for handle in (out, err):
            handle.seek(0)
            texts.append(handle.read().decode(errors="replace"))
    return subprocess.CompletedProcess(["train.py", *argv], code, texts[0], texts[1])


def _wait(pid: int, timeout: float, argv: list[str]) -> int:
    """The child's exit status (``-signal`` when a signal ended it); kills it after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(["train.py", *argv], timeout)
        time.sleep(0.05)
