"""Textual-inversion embeddings bundled inside a LoRA file, as kohya's sd-scripts write them for pivotal
tuning and AUTOMATIC1111 reads them, beside the ``lora_unet_*`` / ``lora_te*_*`` tensors:

* SD 1.x/2.x: ``bundle_emb.<token>.string_to_param.*`` = float32 ``[n, dim]``;
* SDXL: ``bundle_emb.<token>.clip_l`` = ``[n, d_l]`` and ``bundle_emb.<token>.clip_g`` = ``[n, d_g]``, one
  vector set per text encoder (AUTOMATIC1111 gathers ``bundle_emb.<token>.<name>`` into a dict per token and
  hands it to its embedding loader, which takes ``{"clip_l", "clip_g"}`` as an SDXL embedding -- the
  standalone SDXL file's layout, ``ldm.io.sdxl_embeddings``).

The token is the word to write in prompts (AUTOMATIC1111 names the embedding after it). A file's bundled
embeddings are read as ``{token: [n, dim]}`` (SD 1.x/2.x) or ``{token: (clip_l, clip_g)}`` (SDXL)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ldm.io.safe_load import load_safetensors_file, open_safetensors, read_safetensors_metadata
from ldm.utils.files import atomic_save_safetensors

__all__ = [
    "BUNDLE_PREFIX",
    "add_bundled_embeddings",
    "apply_bundled_embeddings",
    "read_bundled_embeddings",
    "split_bundled",
]

BUNDLE_PREFIX = "bundle_emb."
VECTOR_NAME = "string_to_param.*"
SDXL_NAMES = ("clip_l", "clip_g")

Bundled = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def bundle_key(token: str, name: str = VECTOR_NAME) -> str:
    if not token or "." in token:
        raise ValueError(f"a bundled embedding's token must be non-empty and have no '.', got {token!r}")
    return f"{BUNDLE_PREFIX}{token}.{name}"


def _matrix(value: torch.Tensor) -> torch.Tensor:
    vectors = torch.as_tensor(value).detach().to("cpu", torch.float32)
    return (vectors.unsqueeze(0) if vectors.ndim == 1 else vectors).contiguous()


def split_bundled(
    tensors: Mapping[str, torch.Tensor], source: str = "LoRA file"
) -> tuple[dict[str, torch.Tensor], dict[str, Bundled]]:
    """(the other tensors, ``{token: [n, dim]}`` or, SDXL, ``{token: (clip_l, clip_g)}``) of a file's
    tensors."""
    rest: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            rest[key] = value
            continue
        token, _, name = key[len(BUNDLE_PREFIX) :].partition(".")
        if name not in (VECTOR_NAME, *SDXL_NAMES) or name in parts.get(token, {}):
            raise ValueError(
                f"{source}: bundled embedding key {key!r} is neither bundle_emb.<token>.{VECTOR_NAME} (SD "
                "1.x/2.x) nor bundle_emb.<token>.clip_l / .clip_g (SDXL)"
            )
        parts.setdefault(token, {})[name] = _matrix(value)
    embeddings: dict[str, Bundled] = {}
    for token, found in parts.items():
        if set(found) == {VECTOR_NAME}:
            embeddings[token] = found[VECTOR_NAME]
        elif set(found) == set(SDXL_NAMES) and found["clip_l"].shape[0] == found["clip_g"].shape[0]:
            embeddings[token] = (found["clip_l"], found["clip_g"])
        else:
            shapes = {name: tuple(v.shape) for name, v in found.items()}
            raise ValueError(
                f"{source}: bundled embedding {token!r} has {shapes}; expected string_to_param.* alone (SD "
                "1.x/2.x) or clip_l and clip_g with the same number of vectors (SDXL)"
            )
    return rest, embeddings


def has_bundled(path: str | os.PathLike) -> bool:
    with open_safetensors(path) as handle:
        names = handle.keys()
    return any(k.startswith(BUNDLE_PREFIX) for k in names)


def read_bundled_embeddings(path: str | os.PathLike) -> dict[str, Bundled]:
    """``{token: [n, dim]}`` (SD 1.x/2.x) / ``{token: (clip_l, clip_g)}`` (SDXL) bundled in a LoRA file (empty
    when it bundles none)."""
    if not has_bundled(path):
        return {}
    return split_bundled(load_safetensors_file(path), str(path))[1]


def add_bundled_embeddings(
    path: str | os.PathLike, embeddings: Mapping[str, torch.Tensor | Sequence[torch.Tensor]]
) -> Path:
    """Rewrite the LoRA ``.safetensors`` at ``path`` (atomically, metadata kept) with ``embeddings``
    bundled: ``{token: [n, dim]}`` as ``string_to_param.*``, ``{token: (clip_l, clip_g)}`` (an SDXL base's two
    vector sets) as ``clip_l`` / ``clip_g``; returns its path."""
    tensors = load_safetensors_file(path)
    metadata = read_safetensors_metadata(path)
    for token, vectors in embeddings.items():
        if isinstance(vectors, torch.Tensor):
            tensors[bundle_key(token)] = _matrix(vectors)
            continue
        if len(vectors) != len(SDXL_NAMES):
            raise ValueError(
                f"bundled embedding {token!r}: {len(vectors)} vector sets; SDXL has clip_l, clip_g"
            )
        for name, value in zip(SDXL_NAMES, vectors):
            tensors[bundle_key(token, name)] = _matrix(value)
    metadata["ss_bundled_embeddings"] = ",".join(embeddings)
    return atomic_save_safetensors(tensors, path, metadata)


def apply_bundled_embeddings(text_encoders: Sequence[Any], path: str | os.PathLike) -> dict[str, int]:
    """Add the tokens a LoRA file bundles to the base's text encoders (one: SD 1.x/2.x vectors; two: SDXL's
    ``clip_l`` / ``clip_g``, each into its encoder); ``{token: number of vectors}``. A bundle of the other
    family, or of widths that do not fit, raises ``ValueError`` naming what was found and what fits, before
    any encoder changes."""
    bundled = read_bundled_embeddings(path)
    widths = [int(e.hidden_size) for e in text_encoders]
    for token, vectors in bundled.items():
        sets = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
        found = [tuple(v.shape) for v in sets]
        if len(sets) != len(text_encoders) or any(v.shape[-1] != w for v, w in zip(sets, widths)):
            kind = "an SD 1.x/2.x embedding" if len(sets) == 1 else "an SDXL embedding (clip_l, clip_g)"
            family = "SDXL: clip_l, clip_g" if len(widths) > 1 else "SD 1.x/2.x"
            raise ValueError(
                f"{path} bundles {token!r} as {kind} of shapes {found}; this base's text encoder(s) are "
                f"{widths} wide ({family}): the LoRA was trained for another model"
            )
    for token, vectors in bundled.items():
        sets = [vectors] if isinstance(vectors, torch.Tensor) else list(vectors)
        for encoder, v in zip(text_encoders, sets):
            encoder.add_placeholder(token, num_vectors=v.shape[0], vectors=v)
    return {token: (v if isinstance(v, torch.Tensor) else v[0]).shape[0] for token, v in bundled.items()}
