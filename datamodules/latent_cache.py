"""The latent cache on disk: a key that covers everything that feeds it, atomic writes, damage detection.

The key hashes the VAE encoder, the resolution, the flip variants and *every* training item: datasets that
can describe themselves cheaply (``fingerprint()``: image files by path, size and modification time, every
caption; the procedural shapes by their generator settings) do so, any other dataset is hashed item by item
(image tensor bytes + caption). Files are written under a unique temporary name and moved into place, so a
killed or concurrent run never leaves a half-written cache; a cache that fails to load or does not match its
key's shape is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from ldm.utils.files import atomic_write
from ldm.utils.logging import get_logger

log = get_logger(__name__)

FORMAT = "latent-cache-v3"
_KEYS = ("means", "stds", "captions", "flip_variants", "flags")


def _update_with_items(digest, dataset: Dataset) -> None:
    for index in range(len(dataset)):
        item = dataset[index]
        digest.update(item["image"].detach().float().contiguous().numpy().tobytes())
        digest.update(str(item.get("caption", "")).encode() + b"\0")


def dataset_fingerprint(dataset: Dataset, digest=None) -> str:
    """SHA-1 over every item that feeds the cache (see module docstring); wrappers are unwrapped."""
    digest = digest or hashlib.sha1()
    digest.update(type(dataset).__name__.encode() + b"|")
    if isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            dataset_fingerprint(part, digest)
    elif isinstance(dataset, Subset):
        digest.update(repr(list(dataset.indices)).encode())
        dataset_fingerprint(dataset.dataset, digest)
    elif hasattr(dataset, "source") and not hasattr(dataset, "fingerprint"):  # Flagged, Repeated
        digest.update(repr({k: v for k, v in vars(dataset).items() if k != "source"}).encode())
        dataset_fingerprint(dataset.source, digest)
    elif hasattr(dataset, "fingerprint"):
        digest.update(str(dataset.fingerprint()).encode())
    else:
        _update_with_items(digest, dataset)
    return digest.hexdigest()


def cache_key(dataset: Dataset, vae_fingerprint: str, resolution, flip_variants: bool, sizes: str = "") -> str:
    """``sizes``: the items' latent sizes (aspect-ratio buckets), when they are not uniform."""
    parts = [FORMAT, vae_fingerprint, str(resolution), str(bool(flip_variants)), dataset_fingerprint(dataset), sizes]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


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
    if means is None or stds is None or [[m.shape for m in v] for v in means] != [[s.shape for s in v] for v in stds]:
        return "means/stds missing or of different shapes"
    if (len(means), len(means[0]) if means else 0) != (variants, expected_items) or \
            len(state["captions"]) != expected_items:
        return f"holds {(len(means), len(means[0]) if means else 0)} latents, expected {(variants, expected_items)}"
    if len(state["flags"]) != expected_items or bool(state["flip_variants"]) != bool(flip_variants):
        return "flags or flip variants do not match"
    if not all(torch.isfinite(t).all() for v in means + stds for t in v):
        return "non-finite latents"
    return None


def _per_item(latents) -> list[list[torch.Tensor]] | None:
    """[variant, N, C, h, w] tensor or (bucketed) per variant a list of N [C, h, w] tensors -> nested lists."""
    if isinstance(latents, torch.Tensor):
        return [list(v) for v in latents] if latents.dim() == 5 else None
    if isinstance(latents, list) and all(isinstance(v, list) for v in latents) and \
            all(isinstance(t, torch.Tensor) and t.dim() == 3 for v in latents for t in v):
        return latents
    return None
