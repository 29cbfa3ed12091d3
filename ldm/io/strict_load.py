"""Strict weight loading: a module takes a state dict only when keys and shapes match exactly, and the error
names the first mismatched keys and shapes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["build_on_meta", "load_strict", "state_dict_mismatches"]


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def state_dict_mismatches(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], limit: int = 5
) -> str:
    """'' when ``given`` has exactly the keys and shapes of ``expected``; else a readable description."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if wrong:
        parts.append(
            f"{len(wrong)} with a different shape (file vs model), e.g. "
            + ", ".join(f"{k} {_shape(given[k])} vs {_shape(expected[k])}" for k in wrong[:limit])
        )
    if missing:
        parts.append(
            f"{len(missing)} missing from the file, e.g. "
            + ", ".join(f"{k} {_shape(expected[k])}" for k in missing[:limit])
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} not in the model, e.g. "
            + ", ".join(f"{k} {_shape(given[k])}" for k in unexpected[:limit])
        )
    return "; ".join(parts)


def load_strict(
    module: nn.Module, state: Mapping[str, torch.Tensor], what: str, source: str, hint: str = ""
) -> nn.Module:
    """Load ``state`` into ``module`` (built on the meta device or not) only if keys and shapes match
    exactly; otherwise ``ValueError`` naming the first mismatched keys and shapes."""
    problems = state_dict_mismatches(module.state_dict(), state)
    if problems:
        raise ValueError(
            f"{source}: the {what} weights do not match the {what} architecture: {problems}."
            + (f" {hint}" if hint else "")
        )
    module.load_state_dict(dict(state), strict=True, assign=True)
    still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"{what}: tensors left unset after loading: {still_meta[:5]}")
    return module


def build_on_meta(factory: Callable[..., nn.Module], config: Mapping[str, Any]) -> nn.Module:
    """``factory(**config)`` built on the meta device (no memory; ``load_strict`` assigns the weights)."""
    with torch.device("meta"):
        return factory(**config)
