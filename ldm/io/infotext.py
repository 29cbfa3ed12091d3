"""AUTOMATIC1111's generation parameters ("infotext", the PNG ``parameters`` chunk PNG Info and civitai read):
the model's and every adapter's short hashes, and the prompt tags that name the adapters with their
multipliers.

The text is the prompt, a ``Negative prompt: ...`` line, then one line of ``Key: value`` pairs separated by
``, ``; a value holding ``,``, ``:`` or a newline is written as a JSON string (A1111's ``quote``). Hashes:

* ``Model hash``: the first 10 hex digits of the checkpoint file's SHA-256 (A1111's ``shorthash``).
* ``Lora hashes: "name: hash, ..."``: per LoRA file the first 12 hex digits of its "addnet" hash (the SHA-256
  of a ``.safetensors`` file's bytes after its header, so metadata edits keep it; other files: the whole
  file), the LoRA named by its file name, also tagged ``<lora:name:multiplier>`` in the prompt.
* ``TI hashes: "token: hash, ..."``: per embedding the first 12 hex digits of the file's SHA-256.
* ``Hypernet``, ``Hypernet hash`` (10 digits), ``Hypernet strength``; the prompt tag
  ``<hypernet:name:strength>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

from ldm.utils.file_identity import sha256_of

__all__ = ["adapter_fields", "addnet_hash", "format_infotext", "model_hash", "quote"]


def quote(text: str) -> str:
    """A value as A1111 writes it: as is, or a JSON string when it holds ``,``, ``:`` or a newline."""
    text = str(text)
    if not any(c in text for c in ",:\n"):
        return text
    return json.dumps(text, ensure_ascii=False)


def model_hash(path: str | os.PathLike) -> str | None:
    """A1111's ``Model hash`` of a checkpoint file (10 hex digits); None for a folder or hub id."""
    return sha256_of(path)[:10] if Path(path).is_file() else None


def addnet_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a ``.safetensors`` file's tensor bytes (everything after its header), else of the
    whole file: the hash A1111 and kohya's additional-networks give LoRA files."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return sha256_of(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        handle.seek(8 + header_size)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_fields(
    loras: Sequence[tuple[str, float]] = (),
    embeddings: Sequence[tuple[str, str]] = (),
    hypernetwork: tuple[str, float] | None = None,
) -> tuple[str, dict[str, str]]:
    """(prompt tags, infotext fields) for the adapters an image was made with: ``loras`` (path, multiplier),
    ``embeddings`` (path, token), ``hypernetwork`` (path, strength)."""
    tags, fields = [], {}
    lora_hashes = []
    for path, multiplier in loras:
        name = Path(path).stem
        tags.append(f"<lora:{name}:{multiplier:g}>")
        lora_hashes.append(f"{name}: {addnet_hash(path)[:12]}")
    if lora_hashes:
        fields["Lora hashes"] = quote(", ".join(lora_hashes))
    if embeddings:
        fields["TI hashes"] = quote(", ".join(f"{token}: {sha256_of(p)[:12]}" for p, token in embeddings))
    if hypernetwork is not None:
        path, strength = hypernetwork
        name = Path(path).stem
        tags.append(f"<hypernet:{name}:{strength:g}>")
        fields.update(
            {
                "Hypernet": quote(name),
                "Hypernet hash": sha256_of(path)[:10],
                "Hypernet strength": f"{strength:g}",
            }
        )
    return " ".join(tags), fields


def format_infotext(prompt: str, negative: str, fields: Mapping[str, object]) -> str:
    """The ``parameters`` text: prompt, ``Negative prompt:`` line (when any), the ``Key: value`` line."""
    lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    return "\n".join([*lines, ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)])
