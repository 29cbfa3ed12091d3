"""CLIP text encoder files: load weights + tokenizer from a local folder (diffusers or plain CLIP) or a
Hugging Face Hub id (offline-aware, with an error that says what to do), and save a tokenizer in the files
every reader understands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import CLIPTextModel, CLIPTokenizer

from ldm.utils.hub import hub_offline, looks_like_hub_id

__all__ = ["load_clip_files", "save_tokenizer"]


def load_clip_files(
    path: str | os.PathLike,
    subfolder: str | None = None,
    tokenizer_subfolder: str | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
    hub_cache_dir: str | os.PathLike | None = None,
) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """(text model, tokenizer) from a local folder or a hub id (see ``CLIPTextEncoder.from_pretrained``)."""
    path = os.fspath(path)
    local = Path(path).expanduser()
    if local.is_dir():
        return _load_local(local, subfolder, tokenizer_subfolder)
    if not looks_like_hub_id(path, require_namespace=False):
        raise FileNotFoundError(f"text encoder folder {path!r} does not exist (and is not a hub id)")
    if local_files_only is None:
        local_files_only = hub_offline()
    if tokenizer_subfolder is None:
        tokenizer_subfolder = "tokenizer" if subfolder == "text_encoder" else subfolder
    hub_kwargs: dict[str, Any] = {"local_files_only": local_files_only, "revision": revision}
    if hub_cache_dir is not None:
        hub_kwargs["cache_dir"] = os.fspath(hub_cache_dir)
    try:
        model = _load_text_model(path, subfolder=subfolder or "", **hub_kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder=tokenizer_subfolder or "", **hub_kwargs)
    except OSError as err:
        why = (
            "HF_HUB_OFFLINE=1 (or local_files_only=True) allows only the local Hugging Face cache, "
            "and it does not hold this model"
            if local_files_only
            else "it could not be downloaded"
        )
        hint = "" if subfolder else ' (pass subfolder="text_encoder" for a diffusers repo)'
        raise OSError(
            f"{path!r} is not a local folder, so it was treated as a Hugging Face Hub id, but {why}. "
            "Point `path` at a local folder instead (a diffusers model folder with text_encoder/ and "
            "tokenizer/, or a CLIP folder with config.json, weights, vocab.json and merges.txt), or "
            "on a machine with network access set HF_HUB_OFFLINE=0 so it can be downloaded"
            f"{hint}. "
            f"Original error: {err}"
        ) from err
    return model, tokenizer


def _load_local(
    local: Path, subfolder: str | None, tokenizer_subfolder: str | None
) -> tuple[CLIPTextModel, CLIPTokenizer]:
    model_dir, tokenizer_dir = _resolve_local_layout(local, subfolder, tokenizer_subfolder)
    try:
        model = _load_text_model(str(model_dir), local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except OSError as err:
        raise OSError(
            f"could not load a CLIP text encoder from the local folder {str(local)!r} (model from "
            f"{str(model_dir)!r}, tokenizer from {str(tokenizer_dir)!r}): {err}. Expected a diffusers "
            "folder with text_encoder/ and tokenizer/, or a CLIP folder with config.json, "
            "model weights, and vocab.json + merges.txt (or tokenizer.json)."
        ) from err
    return model, tokenizer


def _load_text_model(path: str, **kwargs: Any) -> CLIPTextModel:
    """``CLIPTextModel.from_pretrained`` that refuses missing weights (they would stay random);
    unexpected ones (e.g. the vision tower of a full CLIP folder) are logged by transformers."""
    model, info = CLIPTextModel.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"text encoder weights at {path!r} lack {len(missing)} tensors, e.g. {missing[:5]}")
    return model


def _resolve_local_layout(
    root: Path, subfolder: str | None, tokenizer_subfolder: str | None
) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) inside a local diffusers or plain CLIP folder."""
    if subfolder is None and (root / "text_encoder" / "config.json").is_file():
        subfolder = "text_encoder"
    model_dir = root / subfolder if subfolder else root
    if tokenizer_subfolder is None:
        tokenizer_files = ("tokenizer.json", "vocab.json")
        if (root / "tokenizer").is_dir():
            tokenizer_subfolder = "tokenizer"
        elif subfolder and any((model_dir / f).is_file() for f in tokenizer_files):
            tokenizer_subfolder = subfolder
    tokenizer_dir = root / tokenizer_subfolder if tokenizer_subfolder else root
    return model_dir, tokenizer_dir


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | os.PathLike) -> Path:
    """``tokenizer.save_pretrained(folder)``, plus ``vocab.json`` + ``merges.txt`` when transformers wrote
    only ``tokenizer.json`` (transformers 5), because slow ``CLIPTokenizer`` readers need them."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not (folder / "vocab.json").is_file() and hasattr(getattr(backend, "model", None), "save"):
        backend.model.save(str(folder))
    return folder
