"""Build callbacks and loggers from their config groups (every node has a ``_target_``)."""

from __future__ import annotations

import hydra
from lightning import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig


def _instantiate_all(cfg: DictConfig | None, kind: str) -> list:
    objects = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"the {kind} config must be a mapping of name -> config, got {type(cfg).__name__}")
    for node in cfg.values():
        if isinstance(node, DictConfig) and "_target_" in node:
            objects.append(hydra.utils.instantiate(node))
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    return _instantiate_all(cfg, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return _instantiate_all(cfg, "logger")
