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


# bytes per element of the dtypes the safetensors format defines
_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}
_SUB_BYTE = ("F4", "F6_E2M3", "F6_E3M2")


def _entry_problem(name: str, entry: object) -> str:
    """What is wrong with one tensor entry of a safetensors header ('' when nothing)."""
    if not isinstance(entry, dict):
        return f"tensor {name!r} is described by {type(entry).__name__}, not by dtype/shape/data_offsets"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _SAFETENSORS_ITEMSIZE and dtype not in _SUB_BYTE:
        return f"tensor {name!r} has the unknown dtype {dtype!r}"
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"tensor {name!r} has the invalid shape {shape!r}"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return f"tensor {name!r} has the invalid data_offsets {offsets!r}"
    if dtype in _SUB_BYTE:
        return ""  # packed: the library checks their size
    count = 1
    for d in shape:
        count *= d
    if count * _SAFETENSORS_ITEMSIZE[dtype] != offsets[1] - offsets[0]:
        return (
            f"tensor {name!r} ({dtype} {shape}) needs {count * _SAFETENSORS_ITEMSIZE[dtype]} bytes but "
            f"data_offsets {offsets} give {offsets[1] - offsets[0]}"
        )
    return ""


def _header_problem(entries: dict) -> str:
    """What the ``safetensors`` library would refuse in a parsed header ('' when nothing)."""
    metadata = entries.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        return "its __metadata__ is not a map of strings"
    tensors = {k: v for k, v in entries.items() if k != "__metadata__"}
    for name, entry in tensors.items():
        problem = _entry_problem(name, entry)
        if problem:
            return problem
    end = 0
    for name, entry in sorted(tensors.items(), key=lambda item: item[1]["data_offsets"]):
        if entry["data_offsets"][0] != end:
            return f"tensor {name!r} starts at byte {entry['data_offsets'][0]} of the data, expected {end}"
        end = entry["data_offsets"][1]
    return ""


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedFileError` unless ``path`` has a readable, valid safetensors header and all its
    data (the checks the ``safetensors`` library makes, whose own error does not name the file)."""
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
        kind = (
            "empty"
            if size == 0
            else "a text file"
            if _looks_like_text(prefix)
            else "damaged or not a .safetensors file"
        )
        raise DamagedFileError(
            f"{path} is {kind} ({size} bytes): its safetensors header is unreadable. Check the "
            "path, or re-download / re-export the file."
        )
    problem = _header_problem(entries)
    if problem:
        raise DamagedFileError(
            f"{path} is damaged or not a .safetensors file: {problem}. Re-download or re-export it."
        )
    ends = [v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"]
    if 8 + header_len + max(ends, default=0) > size:
        raise DamagedFileError(
            f"{path} is truncated ({size} bytes, its header describes "
            f"{8 + header_len + max(ends)}). Re-download or re-export it."
        )
