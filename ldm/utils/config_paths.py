"""Local paths in the config a checkpoint carries, made absolute.

A checkpoint's ``model_config`` names the files the model was built from (a text encoder folder, the
fine-tuning base, a replacement VAE). Given relative to where ``train.py`` ran, they would resolve against
whatever directory loads the checkpoint later (``sample.py`` elsewhere, a benchmark's child process) and
fail there. ``absolute_local_paths`` rewrites the ones that exist on disk; hub ids and names stay as given.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["PATH_KEYS", "absolute_local_paths", "is_path_key"]

PATH_KEYS = ("path", "base", "base_tokenizer")  # plus every key ending in _path / _ckpt


def is_path_key(key: Any) -> bool:
    key = str(key)
    return key in PATH_KEYS or key.endswith(("_path", "_ckpt"))


def absolute_local_paths(node: Any, cwd: str | os.PathLike | None = None) -> Any:
    """A copy of ``node`` (nested dicts / lists) whose path-valued keys (``is_path_key``) that are relative
    and exist under ``cwd`` (default: the working directory) are absolute; everything else unchanged."""
    root = Path.cwd() if cwd is None else Path(cwd)
    if isinstance(node, dict):
        return {key: _absolute(key, value, root) for key, value in node.items()}
    if isinstance(node, list):
        return [absolute_local_paths(item, root) for item in node]
    return node


def _absolute(key: Any, value: Any, root: Path) -> Any:
    if isinstance(value, str) and is_path_key(key) and value and not os.path.isabs(value):
        candidate = root / value
        return str(candidate.resolve()) if candidate.exists() else value
    return absolute_local_paths(value, root)
