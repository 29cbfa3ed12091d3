"""Recognise damaged or foreign files before a loader fails on them with a message that names nothing.

``torch.load`` on a text file says ``KeyError: 101`` or "invalid load key"; on a truncated checkpoint it
fails deep in miniz; ``safetensors`` says "header too large" without the file name. These checks give one
line: which file, what is wrong with it, what to do.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

__all__ = ["DamagedFileError", "check_safetensors_file", "check_torch_file"]


class DamagedFileError(ValueError):
    """A file that is truncated, corrupt, or not of the format its name says."""


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def check_torch_file(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedFileError` unless ``path`` is a complete ``torch.save`` file (zip or legacy
    pickle)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise DamagedFileError(
                f"{path} is damaged or truncated ({size} bytes, {err}); it was probably still being written "
                "when a run stopped. Use another checkpoint (e.g. a step_*.ckpt beside it) or delete this "
                "one."
            ) from None
        return
    if head[:1] == b"\x80":  # legacy (pre-1.6) pickle: torch.load checks the rest weights-only
        return
    what = "empty" if size == 0 else ("a text file" if _looks_like_text(head) else "not a PyTorch checkpoint")
    raise DamagedFileError(
        f"{path} is {what} ({size} bytes, starts with {head[:24]!r}), not a checkpoint written by "
        "torch.save. Check the path; checkpoints are .ckpt/.pt/.bin files, Stable Diffusion models also "
        ".safetensors."
    )


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedFileError` unless ``path`` has a readable safetensors header and all its data."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        header = f.read(header_len) if 0 < header_len <= min(size - 8, 100_000_000) else b""
    try:
        entries = json.loads(header.decode("utf-8")) if header else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        entries = None
    if not isinstance(entries, dict):
        kind = "a text file" if _looks_like_text(prefix) else "damaged or not a .safetensors file"
        raise DamagedFileError(
            f"{path} is {kind} ({size} bytes): its safetensors header is unreadable. Check the "
            "path, or re-download / re-export the file."
        )
    ends = [v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + header_len + max(ends, default=0) > size:
        raise DamagedFileError(
            f"{path} is truncated ({size} bytes, its header describes "
            f"{8 + header_len + max(ends)}). Re-download or re-export it."
        )
