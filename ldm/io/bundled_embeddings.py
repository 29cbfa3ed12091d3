"""Textual-inversion embeddings bundled inside a LoRA file, as kohya's sd-scripts write them for pivotal
tuning and AUTOMATIC1111 reads them: ``bundle_emb.<token>.string_to_param.*`` = float32 ``[n, dim]`` beside
the ``lora_unet_*`` / ``lora_te_*`` tensors. The token is the word to write in prompts (AUTOMATIC1111 names
the embedding after it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm.io.safe_load import load_safetensors_file, open_safetensors, read_safetensors_metadata
from ldm.utils.files import atomic_save_safetensors

__all__ = ["BUNDLE_PREFIX", "add_bundled_embeddings", "read_bundled_embeddings", "split_bundled"]

BUNDLE_PREFIX = "bundle_emb."
VECTOR_NAME = "string_to_param.*"


def bundle_key(token: str) -> str:
    if not token or "." in token:
        raise ValueError(f"a bundled embedding's token must be non-empty and have no '.', got {token!r}")
    return f"{BUNDLE_PREFIX}{token}.{VECTOR_NAME}"


def split_bundled(
    tensors: Mapping[str, torch.Tensor], source: str = "LoRA file"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the other tensors, ``{token: vectors [n, dim]}``) of a file's tensors."""
    rest, embeddings = {}, {}
    for key, value in tensors.items():
        if not key.startswith(BUNDLE_PREFIX):
            rest[key] = value
            continue
        token, _, name = key[len(BUNDLE_PREFIX) :].partition(".")
        if name != VECTOR_NAME or token in embeddings:
            raise ValueError(
                f"{source}: bundled embedding key {key!r} is not bundle_emb.<token>.{VECTOR_NAME} (one per "
                "token; SDXL's clip_l/clip_g pairs are not read)"
            )
        vectors = value.float()
        embeddings[token] = vectors.unsqueeze(0) if vectors.ndim == 1 else vectors
    return rest, embeddings


def has_bundled(path: str | os.PathLike) -> bool:
    with open_safetensors(path) as handle:
        names = handle.keys()
    return any(k.startswith(BUNDLE_PREFIX) for k in names)


def read_bundled_embeddings(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{token: vectors [n, dim]}`` bundled in a LoRA file (empty when it bundles none)."""
    if not has_bundled(path):
        return {}
    return split_bundled(load_safetensors_file(path), str(path))[1]


def add_bundled_embeddings(path: str | os.PathLike, embeddings: Mapping[str, torch.Tensor]) -> Path:
    """Rewrite the LoRA ``.safetensors`` at ``path`` (atomically, metadata kept) with ``embeddings``
    (``{token: [n, dim]}``) bundled; returns its path."""
    tensors = load_safetensors_file(path)
    metadata = read_safetensors_metadata(path)
    for token, vectors in embeddings.items():
        matrix = torch.as_tensor(vectors).detach().to("cpu", torch.float32)
        tensors[bundle_key(token)] = (matrix.unsqueeze(0) if matrix.ndim == 1 else matrix).contiguous()
    metadata["ss_bundled_embeddings"] = ",".join(embeddings)
    return atomic_save_safetensors(tensors, path, metadata)
