"""The tokenizer of a Stable Diffusion single file: given (instance or folder), embedded in our exports'
metadata (``ldm.tokenizer/<file>``), the released CLIP tokenizer from the Hugging Face cache, or, offline,
one built from the BPE vocabulary that ``open_clip_torch`` ships (``ldm.io.clip_bpe``)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import CLIPTokenizer

from ldm.io.clip_bpe import OPEN_CLIP_INSTALL_HINT, clip_tokenizer_from_bpe, open_clip_bpe_path
from ldm.io.safe_load import open_safetensors
from ldm.io.sd_keys import CLIP_PREFIX, OPENCLIP_PREFIX, SDXL_CLIP_PREFIX
from ldm.io.sd_presets import DEFAULT_TOKENIZERS, STANDARD_CLIP_VOCAB
from ldm.modules.text_encoder_files import save_tokenizer
from ldm.utils.files import atomic_write_text, cache_dir
from ldm.utils.hub import hub_offline
from ldm.utils.logging import get_logger

__all__ = [
    "TOKENIZER_HINT",
    "TOKENIZER_METADATA_PREFIX",
    "released_tokenizer",
    "resolve_tokenizer",
    "single_file_tokenizer",
    "tokenizer_files",
]

log = get_logger(__name__)

TOKENIZER_METADATA_PREFIX = "ldm.tokenizer/"


def tokenizer_files(tokenizer: CLIPTokenizer) -> dict[str, str]:
    """The tokenizer's files (``tokenizer.json``, ``vocab.json``, ``merges.txt``, configs) as text."""
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(tokenizer, tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _tokenizer_from_files(files: Mapping[str, str]) -> CLIPTokenizer:
    digest = hashlib.sha256(json.dumps(dict(sorted(files.items()))).encode()).hexdigest()[:16]
    folder = cache_dir("sd-tokenizers", digest)
    for name, text in files.items():
        if Path(name).name != name:
            raise ValueError(f"bad embedded tokenizer file name {name!r}")
        atomic_write_text(folder / name, text, only_if_changed=True)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _check_tokenizer(tokenizer: Any, vocab_size: int, source: str) -> Any:
    # transformers 5 returns an EMPTY tokenizer (2 tokens) instead of failing when the files are missing.
    if len(tokenizer) < min(vocab_size, 256 + 2):
        raise OSError(
            f"the tokenizer from {source} has only {len(tokenizer)} tokens (vocabulary files missing?)"
        )
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer from {source} has {len(tokenizer)} tokens but the text encoder only "
            f"{vocab_size} embeddings"
        )
    return tokenizer


def resolve_tokenizer(
    tokenizer: Any, version: str, metadata: Mapping[str, str], vocab_size: int, max_length: int
) -> CLIPTokenizer | None:
    """The tokenizer for a single file: ``tokenizer`` (an instance or a folder), else one embedded in the
    metadata, else the released one from the Hugging Face cache (or hub when online). None when none is found
    (a warning says how to pass one)."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    if tokenizer is not None:
        folder = Path(tokenizer).expanduser()
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(tokenizer)!r} does not exist")
        loaded = CLIPTokenizer.from_pretrained(
            str(folder), model_max_length=max_length, local_files_only=True
        )
        return _check_tokenizer(loaded, vocab_size, str(folder))
    embedded = {
        k[len(TOKENIZER_METADATA_PREFIX) :]: v
        for k, v in metadata.items()
        if k.startswith(TOKENIZER_METADATA_PREFIX)
    }
    if embedded:
        return _check_tokenizer(_tokenizer_from_files(embedded), vocab_size, "the file's metadata")
    loaded, reason = released_tokenizer(version, vocab_size, max_length)
    if loaded is None:
        log.warning(
            f"no tokenizer for this checkpoint: {reason}. {TOKENIZER_HINT}; without one only token ids "
            "can be encoded."
        )
    return loaded


TOKENIZER_HINT = (
    "Pass a tokenizer folder with vocab.json and merges.txt (e.g. a diffusers model's tokenizer/): "
    "--tokenizer for sample.py / scripts/convert.py, model.base_tokenizer=... for training"
)


def released_tokenizer(
    version: str, vocab_size: int, max_length: int = 77
) -> tuple[CLIPTokenizer | None, str]:
    """(CLIP's tokenizer, "") for a file that embeds none: the released one from the Hugging Face cache (hub
    when online), else one built from ``open_clip_torch``'s BPE file; else (None, why not)."""
    if vocab_size != STANDARD_CLIP_VOCAB:
        return None, "the file embeds none and its vocabulary is not the released CLIP one"
    reason = ""
    if version in DEFAULT_TOKENIZERS:
        repo, subfolder = DEFAULT_TOKENIZERS[version]
        try:
            loaded = CLIPTokenizer.from_pretrained(
                repo, subfolder=subfolder, model_max_length=max_length, local_files_only=hub_offline()
            )
            return _check_tokenizer(loaded, vocab_size, repo), ""
        except Exception as err:  # noqa: BLE001 - any failure means "not available here"
            reason = f"{repo} is not available ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
    bpe = open_clip_bpe_path()
    if bpe is None:
        return None, f"{reason}open_clip_torch (CLIP's vocabulary) is not installed: {OPEN_CLIP_INSTALL_HINT}"
    log.info(f"tokenizer: CLIP's BPE vocabulary from {bpe}")
    pad = "!" if version == "v2" else None  # SD 2.x pads with "!", v1 with <|endoftext|>
    return _check_tokenizer(clip_tokenizer_from_bpe(bpe, max_length, pad), vocab_size, str(bpe)), ""


def single_file_tokenizer(path: str | os.PathLike, max_length: int = 77) -> CLIPTokenizer | None:
    """Before any weights load: None when the ``.safetensors`` file embeds a tokenizer (or is not an SD file),
    else the tokenizer ``released_tokenizer`` finds for it; ``LookupError`` (with ``TOKENIZER_HINT``) when
    there is none, so a user learns it before gigabytes are read."""
    with open_safetensors(path) as handle:
        metadata = handle.metadata() or {}
        if any(k.startswith(TOKENIZER_METADATA_PREFIX) for k in metadata):
            return None
        keys = set(handle.keys())
        embedding = next(
            (
                k
                for k in (
                    CLIP_PREFIX + "text_model.embeddings.token_embedding.weight",
                    OPENCLIP_PREFIX + "token_embedding.weight",
                    SDXL_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight",
                )
                if k in keys
            ),
            None,
        )
        if embedding is None:
            return None
        vocab_size = handle.get_slice(embedding).get_shape()[0]
    version = next(
        (
            v
            for prefix, v in ((OPENCLIP_PREFIX, "v2"), (SDXL_CLIP_PREFIX, "sdxl"))
            if embedding.startswith(prefix)
        ),
        "v1",
    )
    loaded, reason = released_tokenizer(version, vocab_size, max_length)
    if loaded is None:
        raise LookupError(f"{path} embeds no tokenizer and none is available: {reason}. {TOKENIZER_HINT}")
    return loaded
