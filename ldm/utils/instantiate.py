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


def drop_callbacks_needing_a_logger(callbacks: list[Callback], loggers: list[Logger]) -> list[Callback]:
    """Without a logger (``logger=none``) callbacks that only report to loggers (LearningRateMonitor) have
    nothing to do and Lightning refuses them; leave them out, saying so once."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    if loggers:
        return callbacks
    dropped = [c for c in callbacks if isinstance(c, LearningRateMonitor)]
    if dropped:
        from ldm.utils.logging import get_logger

        get_logger(__name__).info("logger=none: the learning-rate monitor is off (it reports to a logger)")
    return [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
