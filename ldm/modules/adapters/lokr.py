"""LoKr (LyCORIS; Edalati et al. 2022, "KronA"): the delta is a Kronecker product,

    delta = scale * kron(w1, w2)        w1 [a, c], w2 [b, d] (conv: [b, d, kh, kw]), out = a * b, in = c * d

``(a, b)`` and ``(c, d)`` split ``out`` / ``in`` by LyCORIS's ``factorization(dim, factor)`` (the smaller
factor, at most ``factor``, first; ``factor=-1``: as close to a square root as the divisors allow). ``w1`` is
full (``lokr_w1``) or low-rank (``lokr_w1_a`` [a, r] @ ``lokr_w1_b`` [r, c]); ``w2`` is full (``lokr_w2``) or
low-rank (``lokr_w2_a`` [b, r] @ ``lokr_w2_b`` [r, d * kh * kw]). LyCORIS's rules: ``w2`` is full when
``full_matrix`` or ``rank >= max(b, d) / 2``; ``w1`` is low-rank only with ``decompose_both`` and
``rank < max(a, c) / 2``. ``scale = alpha / rank``, except 1 when both factors are full. Initialisation
(LyCORIS): kaiming-uniform everywhere except zeros for ``w2`` (full) or ``w2_b`` (low-rank).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ldm.modules.adapters.delta_layer import DeltaLayer

__all__ = ["LOKR_KEYS", "LoKrLayer", "factorization", "lokr_delta"]

LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n = dimension`` and ``m <= n``: ``factor`` and ``dimension / factor`` when
    ``factor`` divides it, else the most balanced divisor pair with ``m <= factor`` (any, for -1)."""
    if factor > 0 and dimension % factor == 0:
        return min(factor, dimension // factor), max(factor, dimension // factor)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


def _factor(tensors: Mapping[str, torch.Tensor], which: str, shape: tuple, dtype) -> torch.Tensor:
    full = tensors.get(f"lokr_{which}")
    if full is not None:
        return full.to(dtype)
    a, b = tensors[f"lokr_{which}_a"].to(dtype), tensors[f"lokr_{which}_b"].to(dtype)
    return (a @ b.flatten(1)).reshape(shape)


def lokr_delta(
    tensors: Mapping[str, torch.Tensor], shape: torch.Size, scale: float, dtype=torch.float32
) -> torch.Tensor:
    """``scale * kron(w1, w2)`` in ``dtype`` and ``shape``; each factor full or ``_a @ _b``."""
    w1 = tensors.get("lokr_w1")
    a = (w1 if w1 is not None else tensors["lokr_w1_a"]).shape[0]
    c = w1.shape[1] if w1 is not None else tensors["lokr_w1_b"].shape[1]
    out_dim, in_dim, *kernel = shape
    w1 = _factor(tensors, "w1", (a, c), dtype)
    w2 = _factor(tensors, "w2", (out_dim // a, in_dim // c, *kernel), dtype)
    if kernel:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * scale).reshape(shape)


class LoKrLayer(DeltaLayer):
    """LoKr on an ``nn.Linear`` / ``nn.Conv2d``. ``factor``, ``decompose_both``, ``full_matrix``: the module
    docstring. ``structure`` (``from_tensors``) fixes ``(a, c)``, and which factors are low-rank, directly."""

    algo = "lokr"

    def __init__(
        self,
        base: nn.Module,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        lora_dtype: torch.dtype | None = None,
        factor: int = -1,
        decompose_both: bool = False,
        full_matrix: bool = False,
        structure: tuple[int, int, bool, bool] | None = None,
    ):
        super().__init__()
        self._init_delta(base, rank, alpha, dropout, lora_dtype)
        out_dim, in_dim, *kernel = self.weight.shape
        if structure is None:
            a, b = factorization(out_dim, factor)
            c, d = factorization(in_dim, factor)
            low_w1 = decompose_both and self.rank < max(a, c) / 2 and not full_matrix
            low_w2 = self.rank < max(b, d) / 2 and not full_matrix
        else:
            a, c, low_w1, low_w2 = structure
            b, d = out_dim // a, in_dim // c
        self.structure = (a, c, low_w1, low_w2)
        self._keys = (("lokr_w1_a", "lokr_w1_b") if low_w1 else ("lokr_w1",)) + (
            ("lokr_w2_a", "lokr_w2_b") if low_w2 else ("lokr_w2",)
        )
        r, dk = self.rank, d * math.prod(kernel)
        shapes = {
            "lokr_w1": (a, c),
            "lokr_w1_a": (a, r),
            "lokr_w1_b": (r, c),
            "lokr_w2": (b, d, *kernel),
            "lokr_w2_a": (b, r),
            "lokr_w2_b": (r, dk),
        }
        for key in self._keys:
            setattr(self, key, nn.Parameter(torch.empty(shapes[key], **self.factory)))
        with torch.no_grad():
            for key in self._keys:
                if key in ("lokr_w2", "lokr_w2_b"):
                    nn.init.zeros_(getattr(self, key))
                else:
                    nn.init.kaiming_uniform_(getattr(self, key), a=math.sqrt(5))

    @classmethod
    def from_tensors(cls, base: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float | None):
        low_w1, low_w2 = "lokr_w1" not in tensors, "lokr_w2" not in tensors
        w1 = tensors["lokr_w1_a"] if low_w1 else tensors["lokr_w1"]
        c = tensors["lokr_w1_b"].shape[1] if low_w1 else w1.shape[1]
        rank = (tensors["lokr_w1_a"] if low_w1 else tensors["lokr_w2_a"]).shape[1] if low_w1 or low_w2 else 1
        layer = cls(base, rank=rank, alpha=alpha, structure=(w1.shape[0], c, low_w1, low_w2))
        with torch.no_grad():
            for key, param in layer.adapter_tensors().items():
                param.copy_(tensors[key].reshape(param.shape))
        return layer

    @property
    def scale(self) -> float:
        """``alpha / rank``; 1 when both factors are full (LyCORIS ignores alpha then)."""
        _, _, low_w1, low_w2 = self.structure
        return self.alpha / self.rank if low_w1 or low_w2 else 1.0

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {key: getattr(self, key) for key in self._keys}

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        return lokr_delta(self.adapter_tensors(), self.weight.shape, self.scale, dtype)
