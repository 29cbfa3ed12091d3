"""Hugging Face Hub conventions: is the hub offline, and does a string name a hub repository."""

from __future__ import annotations

import os
import re

__all__ = ["WEIGHT_SUFFIXES", "hub_offline", "looks_like_hub_id"]

WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")
_TRUTHY = {"1", "on", "yes", "true"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, read at call time."""
    return any(
        os.environ.get(name, "").strip().lower() in _TRUTHY
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_like_hub_id(text: str, require_namespace: bool = True) -> bool:
    """True for ``organisation/name`` (or a bare ``name`` when ``require_namespace=False``); never for a
    string ending in a weights-file suffix or starting with ``.``, ``~`` or ``/``."""
    if not _HUB_ID.match(text) or text.endswith(WEIGHT_SUFFIXES):
        return False
    return "/" in text or not require_namespace
