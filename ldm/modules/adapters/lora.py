"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as plain modules.

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
device sync per forward); ``lora_state_dict`` exports ``alpha`` as a 0-d tensor next to the weights.
``remove_lora`` puts plain ``nn.Linear`` / ``nn.Conv2d`` modules back holding the same Parameters,
so the model's original state-dict keys (and its parameters' ``requires_grad``) come back exactly.

Target patterns (``inject_lora(targets=...)``) are matched against qualified module names from
``model.named_modules()``: a plain pattern is an ``fnmatch`` glob over the whole name (``*`` also
crosses dots, ``[qkv]`` is a character class); a pattern starting with ``re:`` is a regular
expression that must match the whole name (``re.fullmatch``). Matching modules that are not
``nn.Linear`` / ``nn.Conv2d`` (containers, norms) are skipped; a pattern list that matches no layer
raises. The presets below use LDM UNet names (``ldm/modules/unet.py``) and transformers CLIP names.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TEXT_ENCODER",
    "TEXT_ENCODER_ALL",
    "TEXT_ENCODER_MLP",
    "UNET_ATTENTION",
    "UNET_ATTENTION_PROJ",
    "UNET_CONV",
    "UNET_FF",
    "UNET_TRANSFORMER",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "inject_lora",
    "load_lora_state_dict",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "make_lora_layer",
    "match_targets",
    "merge_lora",
    "remove_lora",
    "set_lora_multiplier",
    "unmerge_lora",
]

# ------------------------------------------------------------------------------------------ presets

#: Self- and cross-attention projections of every UNet transformer block.
UNET_ATTENTION: tuple[str, ...] = (
    "*.transformer_blocks.*.attn[12].to_[qkv]",
    "*.transformer_blocks.*.attn[12].to_out.0",
)
#: ... plus the spatial transformers' ``proj_in`` / ``proj_out`` (1x1 conv in SD1, linear in SD2).
UNET_ATTENTION_PROJ: tuple[str, ...] = UNET_ATTENTION + ("*.proj_in", "*.proj_out")
#: The transformer blocks' gated feed-forward (GEGLU projection and output linear).
UNET_FF: tuple[str, ...] = ("*.transformer_blocks.*.ff.net.0.proj", "*.transformer_blocks.*.ff.net.2")
#: Every linear / 1x1 conv inside the spatial transformers: what kohya sd-scripts trains by default.
UNET_TRANSFORMER: tuple[str, ...] = UNET_ATTENTION_PROJ + UNET_FF
#: ResBlock convs, time-embedding projections and the down/up-sampling convs ("LoCon"-style,
#: kohya ``conv_dim``). Identity skip connections are skipped automatically.
UNET_CONV: tuple[str, ...] = (
    "*.in_layers.2",
    "*.out_layers.3",
    "*.emb_layers.1",
    "*.skip_connection",
    "*.op",
    "*.conv",
)
#: CLIP text encoder self-attention projections.
TEXT_ENCODER: tuple[str, ...] = ("*.self_attn.[qkv]_proj", "*.self_attn.out_proj")
#: CLIP text encoder MLPs.
TEXT_ENCODER_MLP: tuple[str, ...] = ("*.mlp.fc1", "*.mlp.fc2")
#: Attention + MLP of the text encoder: what kohya sd-scripts trains by default.
TEXT_ENCODER_ALL: tuple[str, ...] = TEXT_ENCODER + TEXT_ENCODER_MLP


# ------------------------------------------------------------------------------------------ layers


class LoRALayer(nn.Module):
    """Shared logic of ``LoRALinear`` / ``LoRAConv2d``; subclasses build ``lora_down``/``lora_up``
    and implement ``_base_forward`` and ``_delta_weight_2d`` helpers."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    lora_down: nn.Module
    lora_up: nn.Module

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
        return self.scale * (self.lora_up.weight.float() @ self.lora_down.weight.float())

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
        up = self.lora_up.weight.float().flatten(1)  # [out, rank]
        down = self.lora_down.weight.float().flatten(1)  # [rank, in*kh*kw]
        return self.scale * (up @ down).view(self.weight.shape)

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


# ------------------------------------------------------------------------------------------ model-level


def _compile_patterns(targets: str | Iterable[str]):
    if isinstance(targets, str):
        targets = [targets]
    matchers = []
    for pattern in targets:
        if pattern.startswith("re:"):
            matchers.append(re.compile(pattern[3:]).fullmatch)
        else:
            matchers.append(re.compile(fnmatch.translate(pattern)).match)
    if not matchers:
        raise ValueError("targets is empty")
    return matchers


def _inside_lora(name: str, lora_names: set[str]) -> bool:
    """True when an ancestor of ``name`` (a dotted prefix) is in ``lora_names``."""
    while "." in name:
        name = name.rpartition(".")[0]
        if name in lora_names:
            return True
    return False


def match_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Qualified names of the ``nn.Linear`` / ``nn.Conv2d`` (or already-LoRA) modules of ``model``
    matching any pattern of ``targets`` (see the module docstring), in ``named_modules`` order.
    Modules inside LoRA layers (their ``lora_down`` / ``lora_up``) never match."""
    matchers = _compile_patterns(targets)
    lora_names: set[str] = set()
    names = []
    for name, module in model.named_modules():
        if _inside_lora(name, lora_names):
            continue
        if isinstance(module, LoRALayer):
            lora_names.add(name)
        elif not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if any(match(name) for match in matchers):
            names.append(name)
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _invalidate_caches(model: nn.Module) -> None:
    """Weights changed: drop cached outputs (``CLIPTextEncoder.encode_cached``)."""
    for module in model.modules():
        clear = getattr(module, "clear_cache", None)
        if callable(clear):
            clear()


def inject_lora(
    model: nn.Module,
    targets: str | Iterable[str],
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    *,
    freeze_base: bool = True,
    lora_dtype: torch.dtype | None = None,
) -> dict[str, LoRALayer]:
    """Replace the layers of ``model`` matching ``targets`` by LoRA layers, in place.

    Args:
        targets: fnmatch globs (or ``re:``-prefixed regexes) over qualified module names, e.g. the
            presets ``UNET_ATTENTION`` or ``TEXT_ENCODER`` (module docstring has the rules).
        rank, alpha: the low-rank width r and alpha (default ``alpha = rank``, scale 1).
        dropout: dropout probability on the LoRA path's input.
        freeze_base: also set ``requires_grad=False`` on every other non-LoRA parameter of
            ``model`` (the wrapped layers' own base weights are always frozen), so that the LoRA
            parameters are the only trainable ones.
        lora_dtype: dtype of the new parameters (default: each base weight's dtype).

    Returns ``{qualified name: LoRA layer}``. Raises ``ValueError`` if nothing matches or if a
    matching layer already carries a LoRA (``remove_lora`` it first).
    """
    names = match_targets(model, targets)
    if not names:
        raise ValueError(f"no nn.Linear / nn.Conv2d module of {type(model).__name__} matches {targets!r}")
    already = [n for n in names if isinstance(model.get_submodule(n), LoRALayer)]
    if already:
        raise ValueError(f"these modules already carry a LoRA (call remove_lora first): {already[:5]}")
    injected: dict[str, LoRALayer] = {}
    for name in names:
        layer = make_lora_layer(model.get_submodule(name), rank, alpha, dropout, lora_dtype)
        _set_submodule(model, name, layer)
        injected[name] = layer
    if freeze_base:
        adapter = {id(p) for p in lora_parameters(model)}
        for p in model.parameters():
            if id(p) not in adapter:
                p.requires_grad_(False)
    _invalidate_caches(model)
    return injected


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    """``{qualified name: LoRA layer}`` of every LoRA layer in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters only (every ``lora_down`` / ``lora_up`` weight), for the optimiser."""
    params: list[nn.Parameter] = []
    for layer in lora_modules(model).values():
        params.extend(layer.lora_down.parameters())
        params.extend(layer.lora_up.parameters())
    return params


def lora_state_dict(model: nn.Module, include_alpha: bool = True) -> dict[str, torch.Tensor]:
    """Adapter tensors only, under the model's own names: ``<module>.lora_down.weight``,
    ``<module>.lora_up.weight`` and (``include_alpha``) ``<module>.alpha`` (0-d float32)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_modules(model).items():
        out[f"{name}.lora_down.weight"] = layer.lora_down.weight.detach()
        out[f"{name}.lora_up.weight"] = layer.lora_up.weight.detach()
        if include_alpha:
            out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a ``lora_state_dict`` into the (already injected) LoRA layers of ``model``.

    Every LoRA layer must get its down/up weights and every key must belong to a LoRA layer
    (``KeyError`` otherwise); ``.alpha`` entries, when present, set the layers' alpha.
    Merged layers are unmerged first and re-merged after.
    """
    layers = lora_modules(model)
    expected = {f"{n}.lora_{part}.weight" for n in layers for part in ("down", "up")}
    unexpected = [k for k in state_dict if k not in expected and k.removesuffix(".alpha") not in layers]
    missing = sorted(expected - set(state_dict))
    if unexpected or missing:
        raise KeyError(f"LoRA state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, layer in layers.items():
        was_merged = layer.merged
        layer.unmerge()
        layer.lora_down.weight.copy_(state_dict[f"{name}.lora_down.weight"])
        layer.lora_up.weight.copy_(state_dict[f"{name}.lora_up.weight"])
        if f"{name}.alpha" in state_dict:
            layer.alpha = float(state_dict[f"{name}.alpha"])
        if was_merged:
            layer.merge()
    _invalidate_caches(model)


def set_lora_multiplier(model: nn.Module, value: float) -> None:
    """Set the inference multiplier of every LoRA layer (merged layers are re-merged)."""
    for layer in lora_modules(model).values():
        layer.multiplier = value
    _invalidate_caches(model)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA delta (times its multiplier) into the base weights (fast inference)."""
    for layer in lora_modules(model).values():
        layer.merge()
    _invalidate_caches(model)


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora`` (base weights back to their values before merging)."""
    for layer in lora_modules(model).values():
        layer.unmerge()
    _invalidate_caches(model)


def remove_lora(model: nn.Module, merge: bool = False) -> list[str]:
    """Replace every LoRA layer by a plain ``nn.Linear`` / ``nn.Conv2d`` holding its base Parameters.

    ``merge=True`` keeps the deltas (times their multipliers) in the weights; ``merge=False``
    restores the original weights. Either way ``model.state_dict()`` has the original key set.
    Returns the names of the replaced modules.
    """
    layers = lora_modules(model)
    for name, layer in layers.items():
        _set_submodule(model, name, layer.to_base(merge=merge))
    _invalidate_caches(model)
    return list(layers)
