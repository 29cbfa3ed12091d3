"""Textual-inversion embedding files, in the forms other tools exchange.

Written (``save_embedding``), as ``.safetensors``:

* ``"a1111"``: ``{"emb_params": float32[n, dim]}``, the single-key file kohya's sd-scripts write and
  AUTOMATIC1111 / ComfyUI read; those tools name the token after the file (``star.safetensors`` -> ``star``),
  so the placeholder is also kept in the metadata (``ldm_placeholder``).
* ``"diffusers"``: ``{"<token>": float32[n, dim]}``, what ``StableDiffusionPipeline.load_textual_inversion``
  reads.

* ``"a1111_pt"``: AUTOMATIC1111's own ``.pt`` (``{"string_to_token": {"*": 265}, "string_to_param": {"*":
  [n, dim]}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}``), tensors, strings and numbers only, so
  ``torch.load(weights_only=True)`` reads it.

Read (``load_embedding``): all three, plus diffusers' ``learned_embeds.bin`` (``{"<token>": [dim]}``), through
``torch.load(weights_only=True)`` only: a pickle that needs more than tensors and plain containers is refused
(``UnsafeCheckpointError``, with the one-time conversion for a legacy embedding). The token of a ``.pt`` /
``.safetensors`` file is its file name, as in AUTOMATIC1111 (a renamed file triggers under its new name);
``file:token`` overrides it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.io.safe_load import UnsafeCheckpointError, load_safetensors_file, safe_torch_load
from ldm.utils.files import atomic_save_safetensors, atomic_write

__all__ = [
    "EMBEDDING_FORMATS",
    "EMBEDDING_SUFFIXES",
    "LoadedEmbedding",
    "a1111_pt_payload",
    "apply_embedding",
    "load_embedding",
    "parse_embedding_spec",
    "save_embedding",
]

EMBEDDING_FORMATS = ("a1111", "diffusers", "a1111_pt")
EMBEDDING_SUFFIXES = {"a1111": ".safetensors", "diffusers": ".safetensors", "a1111_pt": ".pt"}
A1111_KEY = "emb_params"
PLACEHOLDER_METADATA_KEY = "ldm_placeholder"


@dataclass(frozen=True)
class LoadedEmbedding:
    token: str  # the placeholder to write in prompts
    vectors: torch.Tensor  # float32 [n, dim]
    source: str  # file it came from


def save_embedding(
    path: str | os.PathLike,
    vectors: torch.Tensor,
    token: str,
    fmt: str = "a1111",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``vectors`` [n, dim] (or [dim]) for ``token`` atomically in format ``fmt`` (a ``.safetensors``
    file, or a ``.pt`` for ``"a1111_pt"``); returns its path."""
    if fmt not in EMBEDDING_FORMATS:
        raise ValueError(f"embedding format must be one of {EMBEDDING_FORMATS}, got {fmt!r}")
    path = Path(path)
    if path.suffix != EMBEDDING_SUFFIXES[fmt]:
        raise ValueError(f"{fmt} embeddings are written as {EMBEDDING_SUFFIXES[fmt]}; got {str(path)!r}")
    tensor = _as_matrix(torch.as_tensor(vectors).detach(), str(path)).to("cpu", torch.float32).contiguous()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if fmt == "a1111_pt":
        return atomic_write(path, lambda tmp: torch.save(a1111_pt_payload(tensor, path.stem, meta), tmp))
    key = A1111_KEY if fmt == "a1111" else token
    meta[PLACEHOLDER_METADATA_KEY] = token
    return atomic_save_safetensors({key: tensor}, path, meta)


def a1111_pt_payload(vectors: torch.Tensor, name: str, metadata: Mapping[str, str]) -> dict[str, Any]:
    """AUTOMATIC1111's embedding ``.pt`` dict (what its train tab saves): the vectors under ``"*"``, the
    name, the training step and the base's short hash (first 10 hex digits of its SHA-256) and name."""
    step = str(metadata.get("steps", ""))
    return {
        "string_to_token": {"*": 265},  # the id of "*" in CLIP's vocabulary, as A1111 writes it
        "string_to_param": {"*": vectors},
        "name": name,
        "step": int(step) if step.isdigit() else 0,
        "sd_checkpoint": str(metadata.get("base_sha256", ""))[:10] or None,
        "sd_checkpoint_name": str(metadata.get("base", "")) or None,
    }


def load_embedding(path: str | os.PathLike, token: str | None = None) -> LoadedEmbedding:
    """Read an embedding in any form above. ``token`` overrides the placeholder; otherwise it is the file name
    for ``.safetensors`` and ``.pt`` files (AUTOMATIC1111's rule, whatever name the file holds inside), and
    the key of diffusers' ``learned_embeds.bin``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        _, vectors = _pick_tensor(load_safetensors_file(path), str(path))
        default = path.stem
    else:
        name, vectors = _from_pickle(_load_pickle(path), path)
        default = path.stem if path.suffix == ".pt" or name in ("*", A1111_KEY) else name
    return LoadedEmbedding(token or default, _as_matrix(vectors, str(path)).float(), str(path))


def _load_pickle(path: Path) -> Any:
    try:
        return safe_torch_load(path)
    except UnsafeCheckpointError:
        target = path.with_suffix(".safetensors")
        convert = (
            "import torch, safetensors.torch as st; "
            f"d = torch.load('{path}', weights_only=False)['string_to_param']; "
            "st.save_file({'emb_params': next(iter(d.values())).detach().float().contiguous()}, "
            f"'{target}')"
        )
        raise UnsafeCheckpointError(
            f"refusing to load embedding {path}: a legacy pickle that torch.load(weights_only=True) refuses "
            "(it needs Python classes, and unpickling an untrusted file can run code). If you trust it, "
            f'convert it once: python -c "{convert}" and use {target.name}'
        ) from None


def _from_pickle(payload: Any, path: Path) -> tuple[str, torch.Tensor]:
    """(key, vectors) of a pickled embedding."""
    if not isinstance(payload, Mapping):
        raise TypeError(f"{path}: not an embedding file (got a {type(payload).__name__})")
    if "string_to_param" in payload:  # AUTOMATIC1111 / original textual_inversion
        params = payload["string_to_param"]
        if not isinstance(params, Mapping) or not params:
            raise ValueError(f"{path}: 'string_to_param' holds no tensors")
        return next(iter(params.items()))
    if A1111_KEY in payload:
        return A1111_KEY, payload[A1111_KEY]
    return _pick_tensor(payload, str(path))  # diffusers learned_embeds.bin: {"<token>": [dim]}


def _pick_tensor(tensors: Mapping[str, Any], source: str) -> tuple[str, torch.Tensor]:
    found = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if len(found) != 1:
        hint = (
            " (an SDXL embedding with clip_l/clip_g parts: it fits an SDXL base)"
            if {"clip_l", "clip_g"} <= set(found)
            else ""
        )
        raise ValueError(f"{source}: expected one embedding tensor, found keys {sorted(found)[:6]}{hint}")
    return next(iter(found.items()))


def _as_matrix(vectors: Any, source: str) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or vectors.numel() == 0:
        shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ValueError(f"{source}: embedding must be a tensor [n, dim] (or [dim]), got {shape}")
    return vectors.unsqueeze(0) if vectors.ndim == 1 else vectors


def parse_embedding_spec(spec: str) -> tuple[str, str | None]:
    """``file`` or ``file:token`` -> (file, token or None)."""
    if Path(spec).is_file():
        return spec, None
    path, sep, token = spec.rpartition(":")
    return (path, token or None) if sep and path else (spec, None)


def apply_embedding(text_encoder: Any, spec: str | os.PathLike, token: str | None = None) -> LoadedEmbedding:
    """Load an embedding file (``file[:token]``) into a ``CLIPTextEncoder``: its token then works in prompts
    and negative prompts."""
    path, spec_token = parse_embedding_spec(os.fspath(spec))
    loaded = load_embedding(path, token or spec_token)
    text_encoder.add_placeholder(loaded.token, num_vectors=loaded.vectors.shape[0], vectors=loaded.vectors)
    return loaded
