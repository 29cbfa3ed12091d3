"""SDXL textual-inversion files: one vector set per text encoder,
``{"clip_l": [n, 768], "clip_g": [n, 1280]}``
(``.safetensors``; what AUTOMATIC1111, ComfyUI, kohya's sd-scripts and diffusers' advanced SDXL scripts read
and write). ``clip_l`` is for the first text encoder (CLIP ViT-L), ``clip_g`` for the second (OpenCLIP bigG);
the placeholder is kept in the metadata (``ldm_placeholder``), else it is the file name. The same dict
pickled as a ``.pt`` (tensors only: AUTOMATIC1111's embedding loader takes a ``.pt`` dict holding ``clip_l``
and ``clip_g`` as an SDXL embedding, detaching every value) is written for ``export_format=a1111_pt`` and read
too; its token is the file name (AUTOMATIC1111's rule).

``apply_any_embedding(text_encoders, spec)`` is what sampling calls: a one-encoder base takes the SD 1.x/2.x
forms of ``ldm.io.embeddings``, an SDXL base this form; the other family, or a width that does not fit, is one
clear error naming what was found and what fits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ldm.io.embeddings import PLACEHOLDER_METADATA_KEY, LoadedEmbedding, apply_embedding, parse_embedding_spec
from ldm.io.safe_load import load_safetensors_file, open_safetensors, safe_torch_load
from ldm.utils.files import atomic_save_safetensors, atomic_write

__all__ = ["SDXL_EMBEDDING_KEYS", "apply_any_embedding", "load_sdxl_embedding", "save_sdxl_embedding"]

SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")


def save_sdxl_embedding(
    path: str | os.PathLike,
    vectors: Sequence[torch.Tensor],
    token: str,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``vectors`` (``[clip_l [n, d_l], clip_g [n, d_g]]``) for ``token`` atomically; returns its
    path."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".pt"):
        raise ValueError(f"SDXL embeddings are written as .safetensors (or A1111's .pt); got {str(path)!r}")
    if len(vectors) != 2 or vectors[0].shape[0] != vectors[1].shape[0]:
        raise ValueError("an SDXL embedding is two vector sets [n, d] with the same n (clip_l, clip_g)")
    tensors = {
        key: v.detach().to("cpu", torch.float32).contiguous() for key, v in zip(SDXL_EMBEDDING_KEYS, vectors)
    }
    if path.suffix == ".pt":  # no metadata: the token is the file name, as AUTOMATIC1111 names it
        return atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[PLACEHOLDER_METADATA_KEY] = token
    return atomic_save_safetensors(tensors, path, meta)


def _read(path: Path, probe: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an embedding file; a ``.pt`` gives its tensors when it is the SDXL dict, else
    nothing (``probe``: a pickle torch refuses gives nothing too; the SD 1.x/2.x reader then names why)."""
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {str(path)!r} does not exist")
    if path.suffix == ".pt":  # torch.load(weights_only=True): tensors and containers only
        try:
            payload = safe_torch_load(path)
        except Exception:
            if not probe:
                raise
            return {}, {}
        tensors = (
            {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}
            if isinstance(payload, Mapping)
            else {}
        )
        return tensors if set(SDXL_EMBEDDING_KEYS) <= set(tensors) else {}, {}
    if path.suffix != ".safetensors":
        return {}, {}
    with open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
    return load_safetensors_file(path), metadata


def load_sdxl_embedding(path: str | os.PathLike, token: str | None = None) -> tuple[str, list[torch.Tensor]]:
    """(the placeholder, ``[clip_l [n, d_l], clip_g [n, d_g]]`` float32) of an SDXL embedding file."""
    path = Path(path)
    tensors, metadata = _read(path)
    if not set(SDXL_EMBEDDING_KEYS) <= set(tensors):
        shapes = {k: tuple(v.shape) for k, v in list(tensors.items())[:4]} or "a pickle (.pt/.bin)"
        raise ValueError(
            f"{path}: not an SDXL embedding (found {shapes}); an SDXL base takes "
            '{"clip_l": [n, d_l], "clip_g": [n, d_g]} .safetensors / .pt files (an SD 1.x/2.x embedding, one '
            "[n, 768] or [n, 1024] tensor, fits an SD 1.x/2.x base)"
        )
    vectors = [tensors[k].float() for k in SDXL_EMBEDDING_KEYS]
    vectors = [v.unsqueeze(0) if v.ndim == 1 else v for v in vectors]
    return token or metadata.get(PLACEHOLDER_METADATA_KEY) or path.stem, vectors


def apply_any_embedding(text_encoders: Sequence[Any], spec: str | os.PathLike) -> LoadedEmbedding:
    """Load the embedding ``file[:token]`` into the base's text encoders (one: SD 1.x/2.x forms; two: the
    SDXL form, each set into its encoder); returns what was loaded (the ``clip_l`` vectors for SDXL)."""
    path, token = parse_embedding_spec(os.fspath(spec))
    if len(text_encoders) == 1:
        tensors, _ = _read(Path(path), probe=True)
        if set(SDXL_EMBEDDING_KEYS) <= set(tensors):
            raise ValueError(
                f"{path} is an SDXL embedding (clip_l {tuple(tensors['clip_l'].shape)}, clip_g "
                f"{tuple(tensors['clip_g'].shape)}); this base has one text encoder "
                f"({text_encoders[0].hidden_size} wide), which takes a single [n, "
                f"{text_encoders[0].hidden_size}] embedding. Use it with an SDXL base"
            )
        return apply_embedding(text_encoders[0], spec)
    token, vectors = load_sdxl_embedding(path, token)
    for key, encoder, v in zip(SDXL_EMBEDDING_KEYS, text_encoders, vectors):
        if v.shape[-1] != encoder.hidden_size:
            widths = [e.hidden_size for e in text_encoders]
            raise ValueError(
                f"{path}: {key} is {v.shape[-1]} wide, this base's text encoders are {widths} wide "
                f"(clip_l, clip_g); the embedding was trained for another model"
            )
    for encoder, v in zip(text_encoders, vectors):
        encoder.add_placeholder(token, num_vectors=v.shape[0], vectors=v)
    return LoadedEmbedding(token, vectors[0], str(path))
