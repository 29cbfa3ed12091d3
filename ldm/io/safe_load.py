"""Reading checkpoint files safely: ``.safetensors``, and pickles (``.ckpt``/``.pt``/``.bin``) with
``torch.load(weights_only=True)`` only.

Pickles may hold tensors, containers, numbers and strings, plus numpy scalars and an inert stand-in for the
Lightning ``ModelCheckpoint`` callback state that old Stable Diffusion files carry; anything else is refused
(``UnsafeCheckpointError``), because unpickling an untrusted file can run arbitrary code.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ldm.io.file_checks import DamagedFileError, check_safetensors_file, check_torch_file
from ldm.io.safetensors_stream import read_safetensors

__all__ = [
    "PICKLE_SUFFIXES",
    "UnsafeCheckpointError",
    "load_safetensors_file",
    "open_safetensors",
    "read_checkpoint",
    "read_safetensors_metadata",
    "safe_torch_load",
    "unwrap_state_dict",
]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint that needs more than plain tensors and containers to load."""


class _InertPickledObject:
    """Stands in for known-harmless pickled objects (Lightning callback state); never runs their code."""


def _safe_pickle_globals() -> list:
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtype_classes = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None)) if n.endswith("DType")]
    return [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtype_classes,
        (_InertPickledObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (_InertPickledObject, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    ]


def safe_torch_load(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``: tensors, containers, numbers, strings only (plus numpy scalars
    and inert stand-ins for Lightning callback state). Anything else raises ``UnsafeCheckpointError``; a text,
    empty or truncated file raises ``DamagedFileError`` naming it."""
    check_torch_file(path)
    try:
        with torch.serialization.safe_globals(_safe_pickle_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError:
                if not mmap:
                    raise
                # legacy (pre-zipfile) pickles cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only used to improve the message
            needed = []
        details = ", ".join(needed) or re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()[-1][:300]
        raise UnsafeCheckpointError(
            f"refusing to load {str(path)!r}: it is a pickle that needs Python objects beyond tensors "
            f"({details}), and unpickling an untrusted file can run arbitrary code. Convert it to "
            ".safetensors with a tool you trust, or use a .safetensors / diffusers version of the model."
        ) from None


def read_checkpoint(
    path: str | os.PathLike, dtype: torch.dtype | None = None, keep_dtype: Collection[str] = ()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(flat state dict, metadata) of a ``.safetensors`` file or a weights-only ``.ckpt``/``.pt``/``.bin``.
    A Lightning-style ``{"state_dict": {...}}`` wrapper is removed. ``dtype``: floating tensors of a
    ``.safetensors`` file are converted to it one by one as they are read (``keep_dtype``: names left as
    stored), so the file's and the converted copy never coexist whole; pickles are returned as stored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        metadata = read_safetensors_metadata(path)  # first: names a damaged file
        return read_safetensors(path, dtype, keep_dtype), metadata
    payload = safe_torch_load(path)
    return unwrap_state_dict(payload, str(path)), {}


def unwrap_state_dict(payload: Any, source: str) -> dict[str, torch.Tensor]:
    while isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping):
        kind = type(payload).__name__
        raise ValueError(f"{source} does not hold a state dict (got {kind})")  # noqa: TRY004
    state = {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{source} holds no tensors")
    return state


def _named(path: str | os.PathLike, error: Exception) -> DamagedFileError:
    return DamagedFileError(
        f"{path} is damaged or not a .safetensors file ({error}). Re-download or re-export it."
    )


@contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """``safetensors.safe_open(path, framework="pt")`` after :func:`check_safetensors_file`; an error of the
    ``safetensors`` library (which names no file) becomes a ``DamagedFileError`` naming ``path``."""
    from safetensors import SafetensorError, safe_open

    check_safetensors_file(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as err:
        raise _named(path, err) from None
    with handle:
        yield handle


def load_safetensors_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file(path)``, checked first; errors name ``path`` (see
    :func:`open_safetensors`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors_file(path)
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise _named(path, err) from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata (str -> str) of a ``.safetensors`` file, without loading its tensors."""
    with open_safetensors(path) as handle:
        return dict(handle.metadata() or {})
