"""Textual-inversion embedding files, in the forms other tools exchange.

Written (``save_embedding``), as ``.safetensors``:

* ``"a1111"``: ``{"emb_params": float32[n, dim]}``, the single-key file kohya's sd-scripts write and
  AUTOMATIC1111 / ComfyUI read; those tools name the token after the file (``star.safetensors`` -> ``star``),
  so the placeholder is also kept in the metadata (``ldm_placeholder``).
* ``"diffusers"``: ``{"<token>": float32[n, dim]}``, what ``StableDiffusionPipeline.load_textual_inversion``
  reads.

Read (``load_embedding``): both, plus AUTOMATIC1111's ``.pt`` (``{"string_to_param": {"*": [n, dim]},
"name": ...}``) and diffusers' ``learned_embeds.bin`` (``{"<token>": [dim]}``), through
``torch.load(weights_only=True)`` only: a pickle that needs more than tensors and plain containers is refused
(``UnsafeCheckpointError``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.io.safe_load import load_safetensors_file, open_safetensors, safe_torch_load
from ldm.utils.files import atomic_save_safetensors

__all__ = [
    "EMBEDDING_FORMATS",
    "LoadedEmbedding",
    "apply_embedding",
    "load_embedding",
    "parse_embedding_spec",
    "save_embedding",
]

EMBEDDING_FORMATS = ("a1111", "diffusers")
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
    """Write ``vectors`` [n, dim] (or [dim]) for ``token`` atomically as a ``.safetensors`` file; returns its
    path."""
    if fmt not in EMBEDDING_FORMATS:
        raise ValueError(f"embedding format must be one of {EMBEDDING_FORMATS}, got {fmt!r}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"embeddings are written as .safetensors; got {str(path)!r}")
    tensor = _as_matrix(torch.as_tensor(vectors).detach(), str(path)).to("cpu", torch.float32).contiguous()
    key = A1111_KEY if fmt == "a1111" else token
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[PLACEHOLDER_METADATA_KEY] = token
    return atomic_save_safetensors({key: tensor}, path, meta)


def load_embedding(path: str | os.PathLike, token: str | None = None) -> LoadedEmbedding:
    """Read an embedding in any form above. ``token`` overrides the placeholder; otherwise it is the diffusers
    key, the ``ldm_placeholder`` metadata, the A1111 ``.pt`` ``name``, or the file name (AUTOMATIC1111's
    rule)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        tensors = load_safetensors_file(path)
        with open_safetensors(path) as handle:
            metadata = handle.metadata() or {}
        name, vectors = _pick_tensor(tensors, str(path))
        default = metadata.get(PLACEHOLDER_METADATA_KEY) or (name if name != A1111_KEY else path.stem)
    else:
        payload = safe_torch_load(path)
        name, vectors, default = _from_pickle(payload, path)
    return LoadedEmbedding(token or default, _as_matrix(vectors, str(path)).float(), str(path))


def _from_pickle(payload: Any, path: Path) -> tuple[str, torch.Tensor, str]:
    if not isinstance(payload, Mapping):
        raise TypeError(f"{path}: not an embedding file (got a {type(payload).__name__})")
    if "string_to_param" in payload:  # AUTOMATIC1111 / original textual_inversion
        params = payload["string_to_param"]
        if not isinstance(params, Mapping) or not params:
            raise ValueError(f"{path}: 'string_to_param' holds no tensors")
        name, vectors = next(iter(params.items()))
        return name, vectors, str(payload.get("name") or path.stem)
    if A1111_KEY in payload:
        return A1111_KEY, payload[A1111_KEY], path.stem
    name, vectors = _pick_tensor(payload, str(path))  # diffusers learned_embeds.bin: {"<token>": [dim]}
    return name, vectors, name


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
