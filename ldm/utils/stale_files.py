"""What killed runs leave behind: the temporary files of writes that never finished.

A run killed mid-write (``SIGKILL``, out of memory, a lost node) leaves ``.<name>.<pid>.<random>.tmp`` beside
the checkpoint, adapter or image it was writing (:mod:`ldm.utils.files`); a checkpoint's is as large as the
checkpoint. ``train.py`` removes a run's own stale ones when it starts and when it resumes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from ldm.utils.files import remove_stale_temp_files
from ldm.utils.logging import get_logger

log = get_logger(__name__)

__all__ = ["clean_run_folders", "run_folders"]


def run_folders(
    output_dir: str | os.PathLike, ckpt_path: str | os.PathLike | None = None
) -> list[tuple[Path, bool]]:
    """(folder, recursive) pairs a run owns: its output folder and, when resuming, the run folder of the
    checkpoint (``<run>/checkpoints/<file>`` of a run with ``.hydra/``: all of it, checkpoints and adapters
    included), else only the checkpoint's own folder."""
    folders = [(Path(output_dir), True)]
    if ckpt_path:
        ckpt = Path(ckpt_path)
        run = ckpt.parent.parent
        if ckpt.parent.name == "checkpoints" and (run / ".hydra").is_dir():
            folders.append((run, True))
        else:
            folders.append((ckpt.parent, False))
    return folders


def clean_run_folders(
    output_dir: str | os.PathLike, ckpt_path: str | os.PathLike | None = None, before: float | None = None
) -> list[Path]:
    """Remove the stale temporary files (:func:`~ldm.utils.files.remove_stale_temp_files`: older than
    ``before``, default now, and of a writer that no longer runs) in the run's folders and log them. Rank zero
    only (the other ranks of a run would race it); -> the removed paths."""
    if rank_zero_only.rank != 0:
        return []
    before = time.time() if before is None else before
    removed: list[Path] = []
    for folder, recursive in run_folders(output_dir, ckpt_path):
        removed += remove_stale_temp_files(folder, before, recursive)
    if removed:
        names = ", ".join(str(p) for p in removed[:5]) + (
            f" and {len(removed) - 5} more" if len(removed) > 5 else ""
        )
        log.info(f"Removed {len(removed)} stale temporary file(s) left by killed writes: {names}")
    return removed
