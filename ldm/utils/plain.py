"""Hydra/OmegaConf values -> plain Python values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def to_plain(value: Any) -> Any:
    """OmegaConf containers (Hydra overrides) -> plain dicts/lists; other mappings -> dict; else unchanged."""
    if hasattr(value, "_metadata") and hasattr(value, "_content"):  # omegaconf DictConfig / ListConfig
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return dict(value) if isinstance(value, Mapping) else value
