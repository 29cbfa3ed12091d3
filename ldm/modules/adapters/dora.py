"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"): a LoRA direction and a trained
magnitude per weight,

    W' = m * (W + (alpha / rank) * up @ down) / ||W + (alpha / rank) * up @ down||

with the norm per output row (the paper, PEFT and LyCORIS's default ``wd_on_out``; ``dora_scale`` [out, 1(, 1,
1)]) or per input column (older LyCORIS / AUTOMATIC1111; ``dora_scale`` [1, in(, 1, 1)]); the orientation is
read off ``dora_scale``'s shape. ``m`` (``dora_scale``) starts at ``||W||`` and ``up`` at 0, so ``W' = W`` at
step 0. The delta is ``W' - W``; a multiplier ``s`` gives ``W + s * (W' - W)`` (AUTOMATIC1111 and ComfyUI's
strength). Files: kohya/LyCORIS ``lora_down.weight`` / ``lora_up.weight`` / ``alpha`` / ``dora_scale``; PEFT
``lora_A`` / ``lora_B`` / ``lora_magnitude_vector`` [out].
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.adapters.lora_layers import LoRAConv2d, LoRALayer, LoRALinear, low_rank_product

__all__ = ["DoRAConv2d", "DoRALinear", "dora_delta", "make_dora_layer", "weight_norm"]


def weight_norm(weight: torch.Tensor, on_out: bool = True) -> torch.Tensor:
    """L2 norm of each output row ([out, 1, ...]) or, ``on_out=False``, each input column ([1, in, ...])."""
    ones = [1] * (weight.ndim - 1)
    if on_out:
        return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], *ones)
    return weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, weight.shape[1], *ones[1:])


def dora_delta(weight: torch.Tensor, lora_delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """``W' - W`` for the base ``weight``, the scaled LoRA delta and the magnitude ``dora_scale`` (all one
    dtype; ``dora_scale``'s shape says the norm's axis)."""
    merged = weight + lora_delta
    on_out = dora_scale.shape[0] == weight.shape[0] and dora_scale.numel() == weight.shape[0]
    return merged * (dora_scale / weight_norm(merged, on_out)) - weight


class _DoRA(LoRALayer):
    """What DoRA adds to ``LoRALinear`` / ``LoRAConv2d``: ``dora_scale``, the delta, forward, exact
    unmerge."""

    algo = "dora"
    dora_scale: nn.Parameter

    def _init_dora(self, on_out: bool) -> None:
        norm = weight_norm(self.weight.detach().float(), on_out)
        self.dora_scale = nn.Parameter(norm.to(self.lora_down.weight.dtype))
        self._merged_delta: torch.Tensor | None = None

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_tensors(), "dora_scale": self.dora_scale}

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        lora = self.scale * low_rank_product(self.lora_up.weight, self.lora_down.weight).view(
            self.weight.shape
        )
        weight = self.weight.to(dtype)
        return dora_delta(weight, lora.to(dtype), self.dora_scale.to(dtype))

    def delta_weight(self) -> torch.Tensor:
        return self._delta(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self.merged or self._multiplier == 0.0:
            return out
        dtype = self.lora_down.weight.dtype
        delta = self._delta(dtype) * self._multiplier
        return out + self._delta_op(self.dropout(x.to(dtype)), delta).to(out.dtype)

    def _delta_op(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``multiplier * (W' - W)`` in; the folded tensor is kept, since ``W' - W`` depends on ``W``."""
        if self.merged:
            return
        self._merged_delta = self.delta_weight() * self._multiplier
        self.weight.copy_(self.weight.float() + self._merged_delta.to(self.weight.device))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self.weight.float() - self._merged_delta.to(self.weight.device))
        self._merged_delta = None
        self.merged = False

    @classmethod
    def from_tensors(cls, base: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float | None):
        down, up, scale = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors["dora_scale"]
        on_out = scale.shape[0] == base.weight.shape[0] and scale.numel() == base.weight.shape[0]
        layer = cls(base, rank=down.shape[0], alpha=alpha, on_out=on_out)
        with torch.no_grad():
            layer.lora_down.weight.copy_(down.reshape(layer.lora_down.weight.shape))
            layer.lora_up.weight.copy_(up.reshape(layer.lora_up.weight.shape))
            layer.dora_scale.copy_(scale.reshape(layer.dora_scale.shape))
        return layer


class DoRALinear(_DoRA, LoRALinear):
    """DoRA on an ``nn.Linear``; arguments as ``LoRALinear`` plus ``on_out`` (the norm's axis)."""

    def __init__(self, base: nn.Linear, rank=4, alpha=None, dropout=0.0, lora_dtype=None, on_out=True):
        LoRALinear.__init__(self, base, rank, alpha, dropout, lora_dtype)
        self._init_dora(on_out)

    def _delta_op(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return F.linear(x, delta)


class DoRAConv2d(_DoRA, LoRAConv2d):
    """DoRA on an ``nn.Conv2d``; arguments as ``LoRAConv2d`` plus ``on_out`` (the norm's axis)."""

    def __init__(self, base: nn.Conv2d, rank=4, alpha=None, dropout=0.0, lora_dtype=None, on_out=True):
        LoRAConv2d.__init__(self, base, rank, alpha, dropout, lora_dtype)
        self._init_dora(on_out)

    def _delta_op(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, delta, None, self.stride, self.padding, self.dilation)


def make_dora_layer(base: nn.Module, rank=4, alpha=None, dropout=0.0, lora_dtype=None, on_out=True) -> _DoRA:
    """``DoRALinear`` for an ``nn.Linear``, ``DoRAConv2d`` for an ``nn.Conv2d``."""
    if isinstance(base, nn.Linear):
        return DoRALinear(base, rank, alpha, dropout, lora_dtype, on_out)
    if isinstance(base, nn.Conv2d):
        return DoRAConv2d(base, rank, alpha, dropout, lora_dtype, on_out)
    raise TypeError(f"no DoRA layer for {type(base).__name__} (nn.Linear and nn.Conv2d are supported)")
