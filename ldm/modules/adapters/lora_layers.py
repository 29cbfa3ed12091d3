"""LoRA layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A LoRA layer adds a trainable low-rank delta to a frozen ``nn.Linear`` / ``nn.Conv2d``:

    y = base(x) + multiplier * (alpha / rank) * up(down(dropout(x)))

``down`` [rank, in] (kaiming-uniform, a=sqrt(5), as ``nn.Linear``) and ``up`` [out, rank] (zero init,
so an injected model is unchanged at step 0). For a conv, ``down`` is a conv with the base kernel,
stride, padding and dilation and ``up`` a 1x1 conv (the kohya / LoCon layout), so the merged delta
``up @ down`` is a conv kernel of the base's shape.

State-dict layout (chosen so the base keys never move): the wrapper registers the base ``weight`` and
``bias`` Parameters (the very same objects) directly on itself, so a wrapped ``...attn1.to_q`` shows
``...to_q.weight`` as before, plus ``...to_q.lora_down.weight`` and ``...to_q.lora_up.weight``.
``alpha`` and ``multiplier`` are plain Python floats (not in ``state_dict()``; a buffer would cost a
device sync per forward). ``to_base`` gives back a plain ``nn.Linear`` / ``nn.Conv2d`` holding the same
Parameters, so the model's original state-dict keys (and its parameters' ``requires_grad``) come back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRAConv2d", "LoRALayer", "LoRALinear", "low_rank_product", "make_lora_layer"]


def low_rank_product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up @ down`` in float32, conv kernels flattened:
    [out, r(, 1, 1)] x [r, in(, kh, kw)] -> [out, in * kh * kw]."""
    return up.float().flatten(1) @ down.float().flatten(1)


class LoRALayer(nn.Module):
    """Shared logic of ``LoRALinear`` / ``LoRAConv2d``; subclasses build ``lora_down``/``lora_up``
    and implement ``_base_forward`` and ``_delta_weight_2d`` helpers."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    lora_down: nn.Module
    lora_up: nn.Module
    algo = "lora"  # which adapter algorithm (lora, loha, lokr, dora): file layouts and metadata follow it

    def _init_common(self, base: nn.Module, rank: int, alpha: float | None, dropout: float) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self._multiplier = 1.0
        self.merged = False
        self._merged_factor = 0.0  # multiplier * scale folded into the weight while merged
        # The same Parameter objects as the base module: keys (and memory) unchanged.
        self._base_requires_grad = (
            base.weight.requires_grad,
            None if base.bias is None else base.bias.requires_grad,
        )
        self.weight = base.weight
        self.weight.requires_grad_(False)
        if base.bias is not None:
            self.bias = base.bias
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """The trainable tensors under their file / checkpoint names (the kohya / LyCORIS suffixes)."""
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight}

    def adapter_parameters(self) -> list[nn.Parameter]:
        """What the optimiser trains (every tensor of ``adapter_tensors``)."""
        return list(self.adapter_tensors().values())

    # -------------------------------------------------------------- scale and multiplier

    @property
    def scale(self) -> float:
        """``alpha / rank``: the training-time scale of the low-rank delta."""
        return self.alpha / self.rank

    @property
    def multiplier(self) -> float:
        """Inference strength of the delta (1.0 = as trained, 0.0 = base model). Changing it on a
        merged layer re-merges with the new value."""
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        value = float(value)
        if self.merged:
            self.unmerge()
            self._multiplier = value
            self.merge()
        else:
            self._multiplier = value

    # -------------------------------------------------------------- delta and merging

    def delta_weight(self) -> torch.Tensor:
        """``scale * up @ down`` in the base weight's shape (float32, on the LoRA device)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``multiplier * scale * up @ down`` into the base weight (no-op when merged).

        The delta is computed in float32 and the exact amount folded is remembered, so ``unmerge``
        subtracts the same tensor (round trip exact up to float rounding of the base dtype)."""
        if self.merged:
            return
        factor = self._multiplier
        delta = self.delta_weight() * factor
        self.weight.copy_(self.weight.float() + delta.to(self.weight.device))
        self._merged_factor = factor
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged delta again (no-op when not merged)."""
        if not self.merged:
            return
        delta = self.delta_weight() * self._merged_factor
        self.weight.copy_(self.weight.float() - delta.to(self.weight.device))
        self._merged_factor = 0.0
        self.merged = False

    # -------------------------------------------------------------- forward

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        if self.merged or self._multiplier == 0.0:
            return out
        lora_dtype = self.lora_down.weight.dtype
        delta = self.lora_up(self.lora_down(self.dropout(x.to(lora_dtype))))
        return out + (self._multiplier * self.scale) * delta.to(out.dtype)

    # -------------------------------------------------------------- removal

    def _plain_module(self) -> nn.Module:
        """An empty (meta-device) module of the base type; ``to_base`` fills in the Parameters."""
        raise NotImplementedError

    def to_base(self, merge: bool = False) -> nn.Module:
        """A plain ``nn.Linear`` / ``nn.Conv2d`` holding this layer's base Parameters.

        ``merge=True``: the delta (times the current multiplier) is folded in first; ``False``: any
        merged delta is taken out, restoring the original weights. ``requires_grad`` of the base
        Parameters is restored to what it was before wrapping.
        """
        if merge:
            self.merge()
        else:
            self.unmerge()
        plain = self._plain_module()
        plain.weight = self.weight
        plain.bias = self.bias
        weight_rg, bias_rg = self._base_requires_grad
        self.weight.requires_grad_(weight_rg)
        if self.bias is not None and bias_rg is not None:
            self.bias.requires_grad_(bias_rg)
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, alpha={self.alpha:g}, multiplier={self._multiplier:g}, merged={self.merged}"
        )


class LoRALinear(LoRALayer):
    """``nn.Linear`` + low-rank delta. ``x [..., in_features] -> [..., out_features]``.

    ``lora_down``: Linear(in, rank, no bias), ``lora_up``: Linear(rank, out, no bias).
    ``lora_dtype`` (default: the base weight's dtype) lets fp32 adapters train on an fp16 base.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        lora_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self._init_common(base, rank, alpha, dropout)
        kwargs = {"device": base.weight.device, "dtype": lora_dtype or base.weight.dtype}
        self.lora_down = nn.Linear(self.in_features, self.rank, bias=False, **kwargs)
        self.lora_up = nn.Linear(self.rank, self.out_features, bias=False, **kwargs)
        self._reset_lora_parameters()

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * low_rank_product(self.lora_up.weight, self.lora_down.weight)

    def _plain_module(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")


class LoRAConv2d(LoRALayer):
    """``nn.Conv2d`` (groups=1, zero padding) + low-rank delta. ``[B, in, H, W] -> [B, out, H', W']``.

    ``lora_down``: Conv2d(in, rank) with the base kernel/stride/padding/dilation, weight
    [rank, in, kh, kw]; ``lora_up``: 1x1 Conv2d(rank, out), weight [out, rank, 1, 1]. For SD1's
    1x1 ``proj_in`` / ``proj_out`` this is the linear case on pixels.
    """

    def __init__(
        self,
        base: nn.Conv2d,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        lora_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps nn.Conv2d, got {type(base).__name__}")
        if base.groups != 1 or base.padding_mode != "zeros" or isinstance(base.padding, str):
            raise ValueError(
                "LoRAConv2d supports groups=1, padding_mode='zeros' and numeric padding, got "
                f"groups={base.groups}, padding_mode={base.padding_mode!r}, padding={base.padding!r}"
            )
        self.in_channels = base.in_channels
        self.out_channels = base.out_channels
        self.kernel_size = base.kernel_size
        self.stride = base.stride
        self.padding = base.padding
        self.dilation = base.dilation
        self._init_common(base, rank, alpha, dropout)
        kwargs = {"device": base.weight.device, "dtype": lora_dtype or base.weight.dtype}
        self.lora_down = nn.Conv2d(
            self.in_channels,
            self.rank,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=False,
            **kwargs,
        )
        self.lora_up = nn.Conv2d(self.rank, self.out_channels, 1, bias=False, **kwargs)
        self._reset_lora_parameters()

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * low_rank_product(self.lora_up.weight, self.lora_down.weight).view(
            self.weight.shape
        )

    def _plain_module(self) -> nn.Conv2d:
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device="meta",
        )


def make_lora_layer(
    base: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    lora_dtype: torch.dtype | None = None,
) -> LoRALayer:
    """``LoRALinear`` for an ``nn.Linear``, ``LoRAConv2d`` for an ``nn.Conv2d``."""
    if isinstance(base, nn.Linear):
        return LoRALinear(base, rank, alpha, dropout, lora_dtype)
    if isinstance(base, nn.Conv2d):
        return LoRAConv2d(base, rank, alpha, dropout, lora_dtype)
    raise TypeError(f"no LoRA layer for {type(base).__name__} (nn.Linear and nn.Conv2d are supported)")
