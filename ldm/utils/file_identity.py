"""Name a model file by what it is, not where it lives: file name + content hash.

Shared files (exported SD single files, LoRA metadata) record their base this way, like kohya's
``ss_sd_model_name`` / ``sshs_model_hash``, so they never leak a local path (user names, folder layout).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

__all__ = ["describe_source", "sha256_of"]

_CHUNK = 1 << 20
_FOLDER_FILES = (".safetensors", ".bin", ".ckpt", ".pt", ".json", ".txt", ".model")


@lru_cache(maxsize=32)
def _hash_cached(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """Remembered by the file's stat: size and mtime alone miss a file replaced by one of the same size and
    time (``cp -p``, ``touch -r``); its change time (which no user call can set back) and inode do not."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, or of a folder's model files (relative names + bytes, sorted)."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return _hash_cached(
            str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino
        )
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _FOLDER_FILES):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(sha256_of(file).encode())
    return digest.hexdigest()


def describe_source(source: str | os.PathLike | None) -> dict[str, str]:
    """``{"name": <file or folder name | hub id>, "sha256": <content hash>}`` of a model source. A hub id
    (not an existing path) keeps its name and has no hash; None gives ``{}``."""
    if source is None or str(source) == "":
        return {}
    path = Path(source).expanduser()
    if not path.exists():  # a hub id such as "runwayml/stable-diffusion-v1-5": public, not a local path
        return {"name": str(source)}
    return {"name": path.resolve().name, "sha256": sha256_of(path)}
