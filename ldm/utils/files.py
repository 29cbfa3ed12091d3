"""Atomic file writes and the project's cache folder.

Every file is written under a unique temporary name in its target folder and moved into place with
``os.replace``, so readers (other processes, DDP ranks) see either the old file or the complete new one.
A write that fails because the disk is full or the folder is read-only raises :class:`DiskFullError` /
``PermissionError`` naming the file being written (``torch.save`` alone says ``unexpected pos 576 vs 534``,
safetensors names no file), and leaves no temporary file behind.
The temporary name carries the writer's process id (``.<name>.<pid>.<random>.tmp``): a process killed
mid-write leaves it behind, and :func:`remove_stale_temp_files` removes those whose writer is gone.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "DiskFullError",
    "atomic_link",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_text",
    "cache_dir",
    "remove_stale_temp_files",
]

# .<name>.<pid>.<mkstemp's 8 characters>.tmp; before the pid was added: .<name>.<8 characters>.tmp
_TEMP_NAME = re.compile(r"^\..+?(?:\.(?P<pid>\d+))?\.[a-z0-9_]{8}\.tmp$")


class DiskFullError(OSError):
    """A write that failed for lack of space (``errno`` ENOSPC or EDQUOT); the message names the file."""


# how a full disk reads when it does not arrive as OSError(ENOSPC): torch.save's zip writer, safetensors
# (Rust)
_FULL_DISK_TEXT = (
    "unexpected pos",
    "PytorchStreamWriter failed",
    "No space left on device",
    "os error 28",
    "Disk quota exceeded",
    "os error 122",
)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _free_space(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    return f"{free / 2**20:.1f} MiB"


def write_failure(path: Path, error: BaseException) -> OSError | None:
    """The error to raise instead of ``error`` when writing ``path`` failed for a reason the user fixes (a
    full disk, a read-only folder); None for anything else."""
    code = getattr(error, "errno", None)
    if isinstance(error, DiskFullError) or str(error).startswith("cannot write "):
        return None  # already says it
    io_error = isinstance(error, (OSError, RuntimeError)) or type(error).__name__ == "SafetensorError"
    if code in (errno.ENOSPC, errno.EDQUOT) or (
        io_error and any(text in str(error) for text in _FULL_DISK_TEXT)
    ):
        failure = DiskFullError(
            f"cannot write {path}: the disk is full (or over quota): {_free_space(path.parent)} free in "
            f"{path.parent} ({' '.join(str(error).split())[:120]}). Free some space or write elsewhere "
            "(paths.log_dir=..., --out ...); nothing already saved was changed"
        )
        failure.errno = errno.ENOSPC
        return failure
    if isinstance(error, OSError) and code in _NOT_WRITABLE:
        denied = PermissionError(
            f"cannot write {path}: its folder {path.parent} is not writable "
            f"({os.strerror(code)}). Make it writable or write elsewhere (paths.log_dir=..., "
            "--out ...)"
        )
        denied.errno = code
        return denied
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(temporary path)``, then move the result to ``path`` (parents are created). The file gets
    the usual permissions (``0o666`` minus the umask); on any error the temporary file is removed (a full disk
    or a read-only folder: see the module docstring)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        failure = write_failure(path, error)
        if failure is not None:
            raise failure from error
        raise
    return path


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` becomes a hard link to ``source`` (the same bytes, nothing written; deleting ``source`` later
    leaves ``path`` whole), replacing whatever ``path`` was atomically; a copy where links are not possible
    (another file system)."""

    def link(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)

    return atomic_write(path, link)


def atomic_write_text(path: str | os.PathLike, text: str, only_if_changed: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; ``only_if_changed`` leaves an identical file alone."""
    path = Path(path)
    if only_if_changed and path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """``safetensors.torch.save_file`` to ``path``, atomically."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata or {})))


def cache_dir(*parts: str) -> Path:
    """``$LDM_CACHE_DIR`` (default ``<system temp>/ldm-cache``) joined with ``parts``; not created."""
    root = os.environ.get("LDM_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "ldm-cache")
    return Path(root, *parts)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its files
    return True


def remove_stale_temp_files(
    folder: str | os.PathLike, before: float | None = None, recursive: bool = True
) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` under ``folder`` that no live process is writing:
    last modified before ``before`` (a time stamp; default now) and written by a process that no longer runs
    (names without a process id: the time alone). -> the removed paths. Symbolic links are not followed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    before = time.time() if before is None else before
    removed = []
    walk = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, _, names in walk:
        for name in names:
            match = _TEMP_NAME.match(name)
            path = Path(root, name)
            if match is None or path.is_symlink() or not path.is_file():
                continue
            pid = match.group("pid")
            if pid is not None and (int(pid) == os.getpid() or _process_alive(int(pid))):
                continue
            try:
                if path.stat().st_mtime < before:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:  # its writer finished (os.replace) meanwhile
                continue
    return removed
