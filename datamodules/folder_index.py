"""An index of a large image folder, built once from image headers and cached: start-up without decoding.

The index holds every image's path (relative to the root) and size (width, height, EXIF rotation
applied), read from the file header only. It is cached as JSON under ``cache_dir``, keyed by the file
list with each file's size and mtime (any added, removed or rewritten image gives a new key), and
written atomically. Files whose header cannot be read are skipped and reported, like the full scan
does; files with a valid header but a broken body are found when first loaded (the dataset skips and
reports them then).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from datamodules.transforms import image_size
from ldm.utils.files import atomic_write_text
from ldm.utils.logging import get_logger

__all__ = ["INDEX_VERSION", "folder_fingerprint", "load_or_build_index"]

log = get_logger(__name__)

INDEX_VERSION = 1


def folder_fingerprint(root: Path, paths: list[Path]) -> str:
    """sha1 over (relative path, byte size, mtime in ns) of every file, in order."""
    digest = hashlib.sha1(f"v{INDEX_VERSION}".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_headers(root: Path, paths: list[Path]) -> dict:
    sizes, bad = {}, {}
    for path in paths:
        rel = path.relative_to(root).as_posix()
        try:
            width, height = image_size(path)
            if width <= 0 or height <= 0:
                raise ValueError("image has zero size")
            sizes[rel] = [width, height]
        except Exception as error:  # noqa: BLE001 - an unreadable header means "skip this file"
            bad[rel] = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return {"version": INDEX_VERSION, "sizes": sizes, "unreadable": bad}


def load_or_build_index(root: Path, paths: list[Path], cache_dir: str | os.PathLike | None) -> dict:
    """{"sizes": {relative path: [w, h]}, "unreadable": {relative path: reason}} for ``paths``.

    Read from ``cache_dir`` when an index of exactly these files (names, sizes, mtimes) is there;
    otherwise built from the headers (and written there when ``cache_dir`` is given).
    """
    cache = None
    if cache_dir:
        cache = Path(cache_dir).expanduser() / f"index_{folder_fingerprint(root, paths)[:20]}.json"
        if cache.is_file():
            try:
                index = json.loads(cache.read_text(encoding="utf-8"))
                if index.get("version") == INDEX_VERSION:
                    log.info(f"image folder index: {len(index['sizes'])} images from {cache}")
                    return index
            except (OSError, ValueError) as error:
                log.warning(f"ignoring unreadable index cache {cache} ({error}); rebuilding it")
    index = _read_headers(root, paths)
    if cache is not None:
        atomic_write_text(cache, json.dumps(index))
        log.info(f"image folder index: {len(index['sizes'])} images, cached in {cache}")
    return index
