"""The latent cache on disk: a key that covers everything that feeds it, atomic writes, damage detection,
a size bound.

The key hashes the VAE encoder, the resolution, the flip variants and *every* training item: datasets that
can describe themselves cheaply (``fingerprint(check)``: image files by path, size and modification time -
or, with ``check="hash"``, by the SHA-256 of their bytes - every caption; the procedural shapes by their
generator settings) do so, any other dataset is hashed item by item (image tensor bytes + caption). Files are
written under a unique temporary name and moved into place, so a killed or concurrent run never leaves a
half-written cache; a cache that fails to load or does not match its key's shape is rebuilt with a warning.

Entries are ``latents_<key>.pt`` in the cache folder; a run that uses one sets its modification time, and
:func:`evict` removes the least recently used ones beyond a size (``data.cache_max_gb``); :func:`clear`
(``python scripts/clear_cache.py``) removes them all.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from ldm.utils.files import atomic_write, remove_stale_temp_files
from ldm.utils.logging import get_logger

log = get_logger(__name__)

FORMAT = "latent-cache-v4"  # v4: + SDXL's size conditions of every item ("sizes")
_KEYS = ("means", "stds", "captions", "flip_variants", "flags")
CHECKS = ("stat", "hash")
ENTRY_GLOB = "latents_*.pt"
STALE_WRITE_S = 3600  # a temporary cache file untouched this long is a dead write, even from another machine


def _update_with_items(digest, dataset: Dataset) -> None:
    for index in range(len(dataset)):
        item = dataset[index]
        digest.update(item["image"].detach().float().contiguous().numpy().tobytes())
        digest.update(str(item.get("caption", "")).encode() + b"\0")


def check_mode(check: str) -> str:
    if check not in CHECKS:
        raise ValueError(
            f"data.cache_check must be one of {CHECKS} (stat: size and modification time, cheap; "
            f"hash: every image's bytes), got {check!r}"
        )
    return check


def dataset_fingerprint(dataset: Dataset, digest=None, check: str = "stat") -> str:
    """SHA-1 over every item that feeds the cache (see module docstring); wrappers are unwrapped. ``check``:
    how image files are identified (``"stat"``: size + modification time; ``"hash"``: their bytes)."""
    digest = digest or hashlib.sha1()
    digest.update(type(dataset).__name__.encode() + b"|")
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            dataset_fingerprint(part, digest, check)
    elif isinstance(dataset, Subset):
        digest.update(repr(list(dataset.indices)).encode())
        dataset_fingerprint(dataset.dataset, digest, check)
    elif hasattr(dataset, "source") and not hasattr(dataset, "fingerprint"):  # Flagged, Repeated
        digest.update(repr({k: v for k, v in vars(dataset).items() if k != "source"}).encode())
        dataset_fingerprint(dataset.source, digest, check)
    elif hasattr(dataset, "fingerprint"):
        digest.update(str(dataset.fingerprint(check=check)).encode())
    else:
        _update_with_items(digest, dataset)
    return digest.hexdigest()


def cache_key(
    dataset: Dataset,
    vae_fingerprint: str,
    resolution,
    flip_variants: bool,
    sizes: str = "",
    check: str = "stat",
) -> str:
    """``sizes``: the items' latent sizes (aspect-ratio buckets), when they are not uniform."""
    fingerprint = dataset_fingerprint(dataset, check=check_mode(check))
    parts = [FORMAT, vae_fingerprint, str(resolution), str(bool(flip_variants)), fingerprint, sizes]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


def mark_used(path: Path) -> None:
    """Set ``path``'s modification time to now: the least recently *used* entries are evicted first."""
    try:
        os.utime(path)
    except OSError:  # read-only cache: eviction order is then by write time
        pass


def _entries(folder: Path) -> list[tuple[float, int, Path]]:
    """(modification time, size, path) of the cache's entries, oldest first."""
    found = []
    for path in folder.glob(ENTRY_GLOB):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed meanwhile (another run evicting)
            continue
        found.append((stat.st_mtime, stat.st_size, path))
    return sorted(found)


def evict(folder: str | os.PathLike, max_gb: float | None, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used entries until the folder's entries take at most ``max_gb`` GB
    (``None``: no bound; ``keep``, the entry this run uses, stays), and its stale temporary files. Logged."""
    folder = Path(folder)
    removed = remove_stale_temp_files(folder, before=time.time() - STALE_WRITE_S, recursive=False)
    if max_gb is not None:
        entries = _entries(folder)
        total, limit = sum(size for _, size, _ in entries), float(max_gb) * 1e9
        for _, size, path in entries:
            if total <= limit:
                break
            if keep is not None and path == keep:
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
            total -= size
        if total > limit:
            log.warning(f"latent cache {folder}: this run's entry alone is over data.cache_max_gb={max_gb}")
    if removed:
        log.info(
            f"latent cache {folder}: removed {len(removed)} least recently used or stale file(s) "
            f"(data.cache_max_gb={max_gb})"
        )
    return removed


def clear(folder: str | os.PathLike) -> tuple[int, int]:
    """Remove every entry of the cache in ``folder`` and its stale temporary files; -> (files, bytes)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    entries = _entries(folder)
    for _, _, path in entries:
        path.unlink(missing_ok=True)
    stale = remove_stale_temp_files(folder, recursive=False)
    return len(entries) + len(stale), sum(size for _, size, _ in entries)


def save_cache(path: Path, state: dict) -> None:
    """``torch.save`` to a unique temporary file beside ``path``, then ``os.replace``."""
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load_cache(path: Path, expected_items: int, flip_variants: bool) -> dict | None:
    """The cached tensors, or None (with a warning) when the file is damaged or does not fit the data."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        problem = _check(state, expected_items, flip_variants)
    except Exception as error:  # noqa: BLE001 - any failure to read means "rebuild"
        problem = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error) else ''}"
    if problem:
        log.warning(f"latent cache {path} is damaged or stale ({problem}); rebuilding it")
        return None
    return state


def _check(state, expected_items: int, flip_variants: bool) -> str | None:
    if not isinstance(state, dict) or state.get("format") != FORMAT or any(k not in state for k in _KEYS):
        return "unexpected contents"
    variants = 2 if flip_variants else 1
    means, stds = _per_item(state["means"]), _per_item(state["stds"])
    if (
        means is None
        or stds is None
        or [[m.shape for m in v] for v in means] != [[s.shape for s in v] for v in stds]
    ):
        return "means/stds missing or of different shapes"
    if (len(means), len(means[0]) if means else 0) != (variants, expected_items) or len(
        state["captions"]
    ) != expected_items:
        return (
            f"holds {(len(means), len(means[0]) if means else 0)} latents, "
            f"expected {(variants, expected_items)}"
        )
    if len(state["flags"]) != expected_items or bool(state["flip_variants"]) != bool(flip_variants):
        return "flags or flip variants do not match"
    if not all(torch.isfinite(t).all() for v in means + stds for t in v):
        return "non-finite latents"
    sizes = state.get("sizes") or {}
    if not isinstance(sizes, dict) or any(tuple(v.shape) != (expected_items, 2) for v in sizes.values()):
        return "size conditions missing or of the wrong shape"
    return None


def _per_item(latents) -> list[list[torch.Tensor]] | None:
    """[variant, N, C, h, w] tensor or (bucketed) per variant a list of N [C, h, w] tensors -> nested
    lists."""
    if isinstance(latents, torch.Tensor):
        return [list(v) for v in latents] if latents.dim() == 5 else None
    if (
        isinstance(latents, list)
        and all(isinstance(v, list) for v in latents)
        and all(isinstance(t, torch.Tensor) and t.dim() == 3 for v in latents for t in v)
    ):
        return latents
    return None
