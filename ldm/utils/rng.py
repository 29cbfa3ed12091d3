"""Capture and restore every global random number generator (Python, NumPy, torch CPU, CUDA).

The captured state holds only tensors, ints, strings and lists, so a checkpoint holding it still loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["get_rng_states", "set_rng_states"]


def get_rng_states() -> dict:
    """The state of Python's ``random``, NumPy's legacy global RNG, torch's CPU RNG and every CUDA device."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`get_rng_states` captured (CUDA only when present on both sides)."""
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = states["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
