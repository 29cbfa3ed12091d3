"""Adapters defined by a delta weight (LyCORIS-style): the layer computes ``delta = f(adapter tensors)`` in
the base weight's shape and adds ``multiplier * op(x, delta)`` to the frozen layer's output, where ``op`` is
the base layer's own linear / conv2d. LoHa and LoKr (and DoRA, whose delta also depends on the base weight)
subclass this; it keeps ``LoRALayer``'s interface: ``delta_weight()``, ``merge()`` / ``unmerge()``, the
``multiplier`` (0 disables), ``to_base()``, ``adapter_tensors()`` (what checkpoints and files hold, under the
LyCORIS names) and ``adapter_parameters()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.adapters.lora_layers import LoRALayer

__all__ = ["DeltaLayer", "layer_geometry"]


def layer_geometry(base: nn.Module) -> dict:
    """What a delta layer needs of its base: ``{"kind": "linear"|"conv", "stride", "padding", "dilation"}``;
    raises for modules other than ``nn.Linear`` and plain ``nn.Conv2d`` (groups=1, zero padding)."""
    if isinstance(base, nn.Linear):
        return {"kind": "linear"}
    if isinstance(base, nn.Conv2d):
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError(
                "adapters support Conv2d with groups=1, padding_mode='zeros' and numeric padding, got "
                f"groups={base.groups}, padding_mode={base.padding_mode!r}, padding={base.padding!r}"
            )
        return {"kind": "conv", "stride": base.stride, "padding": base.padding, "dilation": base.dilation}
    raise TypeError(f"no adapter layer for {type(base).__name__} (nn.Linear and nn.Conv2d are supported)")


class DeltaLayer(LoRALayer):
    """Base of the delta-weight adapters. Subclasses create their parameters, list them in
    ``adapter_tensors()`` and implement ``_delta(dtype)`` (the scaled delta in the weight's shape)."""

    algo = "delta"

    def _init_delta(
        self, base: nn.Module, rank: int, alpha: float | None, dropout: float, lora_dtype
    ) -> None:
        self.geometry = layer_geometry(base)
        self._init_common(base, rank, alpha, dropout)
        self.factory = {"device": base.weight.device, "dtype": lora_dtype or base.weight.dtype}

    # ---------------------------------------------------------------- the op and the delta

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.geometry["kind"] == "linear":
            return F.linear(x, weight, bias)
        g = self.geometry
        return F.conv2d(x, weight, bias, g["stride"], g["padding"], g["dilation"])

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._op(x, self.weight, self.bias)

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        """The delta (scale included, multiplier not) in ``self.weight``'s shape, computed in ``dtype``."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        return self._delta(torch.float32)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter_tensors().values())

    @property
    def adapter_dtype(self) -> torch.dtype:
        return next(iter(self.adapter_tensors().values())).dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self.merged or self._multiplier == 0.0:
            return out
        dtype = self.adapter_dtype
        delta = self._delta(dtype) * self._multiplier
        return out + self._op(self.dropout(x.to(dtype)), delta).to(out.dtype)

    def _plain_module(self) -> nn.Module:
        out_dim, in_dim, *kernel = self.weight.shape
        bias = self.bias is not None
        if self.geometry["kind"] == "linear":
            return nn.Linear(in_dim, out_dim, bias=bias, device="meta")
        g = self.geometry
        return nn.Conv2d(
            in_dim, out_dim, tuple(kernel), g["stride"], g["padding"], g["dilation"], bias=bias, device="meta"
        )
