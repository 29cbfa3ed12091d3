"""LoHa (LyCORIS; Hyeon-Woo et al. 2022, "FedPara"): the delta is the Hadamard product of two low-rank
products,

    delta = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b)        (reshaped to the base weight's shape)

``hada_w1_a`` / ``hada_w2_a`` [out, rank], ``hada_w1_b`` / ``hada_w2_b`` [rank, in * kh * kw] (convs
flattened, LyCORIS's non-Tucker layout). The product has rank up to rank**2 for 4 * rank * (out + in) / 2
parameters. LyCORIS's initialisation: ``w1_b``, ``w2_b`` ~ N(0, 1), ``w1_a`` ~ N(0, 0.1), ``w2_a`` = 0
(delta 0 at step 0).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ldm.modules.adapters.delta_layer import DeltaLayer

__all__ = ["LOHA_KEYS", "LoHaLayer", "loha_delta"]

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def loha_delta(
    tensors: Mapping[str, torch.Tensor], shape: torch.Size, scale: float, dtype=torch.float32
) -> torch.Tensor:
    """``scale * (w1_a @ w1_b) * (w2_a @ w2_b)`` in ``dtype``, reshaped to ``shape``."""
    w1a, w1b, w2a, w2b = (tensors[k].to(dtype) for k in LOHA_KEYS)
    return ((w1a @ w1b.flatten(1)) * (w2a @ w2b.flatten(1)) * scale).reshape(shape)


class LoHaLayer(DeltaLayer):
    """LoHa on an ``nn.Linear`` / ``nn.Conv2d``: ``y = base(x) + multiplier * op(x, delta)``."""

    algo = "loha"

    def __init__(
        self,
        base: nn.Module,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        lora_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self._init_delta(base, rank, alpha, dropout, lora_dtype)
        out_dim, fan_in = self.weight.shape[0], self.weight[0].numel()
        for key in LOHA_KEYS:
            shape = (out_dim, self.rank) if key.endswith("_a") else (self.rank, fan_in)
            setattr(self, key, nn.Parameter(torch.empty(shape, **self.factory)))
        with torch.no_grad():
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            nn.init.zeros_(self.hada_w2_a)

    @classmethod
    def from_tensors(cls, base: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float | None):
        layer = cls(base, rank=tensors["hada_w1_b"].shape[0], alpha=alpha)
        with torch.no_grad():
            for key, param in layer.adapter_tensors().items():
                param.copy_(tensors[key].reshape(param.shape))
        return layer

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {key: getattr(self, key) for key in LOHA_KEYS}

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        return loha_delta(self.adapter_tensors(), self.weight.shape, self.scale, dtype)
