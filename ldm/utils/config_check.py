"""Check a composed config's plain values before anything is built: ``trainer.max_steps=abc`` or
``model.optimizer.lr=abc`` otherwise fails inside Lightning or the optimiser (``'<' not supported between
'str' and 'int'``, 51 lines of traceback) without naming the key.

The expected type of a value is read from the callable its node targets: where the parameter's default is a
number or a bool, a string value must be one too. Nothing else is judged (a ``None`` default, a string
default, anything the callable's signature does not say).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig

__all__ = ["ConfigValueError", "check_config_values"]


class ConfigValueError(ValueError):
    """A config key whose value is not of the type its target expects."""


def _targets(node: Any, key: str = "") -> Iterator[tuple[str, DictConfig]]:
    """(dotted key, node) of every node with a ``_target_`` under ``node``."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield key, node
        for name in node:
            child = node._get_node(name)
            if isinstance(child, (DictConfig, ListConfig)):
                yield from _targets(child, f"{key}.{name}" if key else str(name))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node):
            yield from _targets(child, f"{key}[{i}]")


def _defaults(target: str) -> dict[str, Any]:
    """{parameter: default} of the callable ``target`` names ({} when it cannot be imported or inspected)."""
    from hydra.utils import get_object

    try:
        function = get_object(target)
        parameters = inspect.signature(function).parameters
    except Exception:  # noqa: BLE001 - instantiate reports a bad target itself
        return {}
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _parses(text: str, kind: type) -> bool:
    if kind is bool:
        return text.lower() in ("true", "false")
    try:
        kind(text)
    except ValueError:
        return False
    return True


def _expected(default: Any) -> type | None:
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float if isinstance(default, float) else int
    return None


def check_config_values(cfg: DictConfig, roots: tuple[str, ...] = ("trainer", "model", "data")) -> None:
    """Raise :class:`ConfigValueError` naming the key, its value and the type expected, for the first string
    value under ``roots`` given where the target's parameter takes a number or a bool."""
    for root in roots:
        node = cfg.get(root)
        for key, target_node in _targets(node, root) if node is not None else ():
            defaults = _defaults(str(target_node._target_))
            for name, default in defaults.items():
                kind = _expected(default)
                if kind is None or name not in target_node:
                    continue
                value = target_node._get_node(name)._value()
                if isinstance(value, str) and not value.startswith("${") and not _parses(value, kind):
                    what = {bool: "true or false", int: "an integer", float: "a number"}[kind]
                    raise ConfigValueError(
                        f"{key}.{name}={value} is not {what}: {target_node._target_} takes {name} as {what} "
                        f"(e.g. {default!r}); fix the override or the config file that sets it"
                    )
