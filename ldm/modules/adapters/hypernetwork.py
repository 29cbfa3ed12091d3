"""Hypernetworks as AUTOMATIC1111 defined them (after NovelAI): small MLPs that rewrite the inputs of the
attention keys and values.

For every width ``w`` it covers, a hypernetwork holds a pair of MLPs ``(mlp_k, mlp_v)``; an attention whose
K/V input (the text context in cross-attention) is ``c`` [B, M, w] then computes

    k = to_k(c + strength * mlp_k(c)),    v = to_v(c + strength * mlp_v(c))

through ``CrossAttention.context_transform``. One pair serves every attention layer of that width.

An MLP is ``nn.Sequential`` named ``linear`` whose entries follow AUTOMATIC1111's layout exactly, so its
``state_dict()`` keys (``linear.0.weight``, ``linear.2.bias``...) are the ones their ``.pt`` files hold. For
each step ``i`` of ``layer_structure`` (multipliers of ``w``, first and last 1, e.g. ``[1, 2, 1]``):
``Linear(w*ls[i], w*ls[i+1])``, then the activation (not after the last Linear unless ``activate_output``;
none for ``linear``), then ``LayerNorm`` if ``layer_norm``, then ``Dropout(p)`` if
``dropout_structure[i+1] > 0``.

Initialisation (``weight_init``, AUTOMATIC1111's names): ``Normal`` (weights N(0, 0.01), biases 0),
``XavierUniform``, ``XavierNormal``, ``KaimingUniform``, ``KaimingNormal`` (biases 0; Kaiming uses the
leaky-ReLU gain for ``leakyrelu``, else ReLU's). LayerNorm weights are N(0, 0.01) whatever the scheme, as
there; ``zero_last_layer`` zeroes the last Linear so an untrained hypernetwork is exactly the identity.

Which attentions: by default only cross-attention (``attn2``, the text context). AUTOMATIC1111 applies a
hypernetwork to *every* attention whose K/V input width it covers, so its files with 320/640/1280 entries
also rewrite SD's self-attention; ``attach_hypernetwork(..., self_attention=True)`` does the same.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ldm.modules.attention import CrossAttention

__all__ = [
    "ACTIVATIONS",
    "WEIGHT_INITS",
    "Hypernetwork",
    "HypernetworkMLP",
    "attach_hypernetwork",
    "attached_attentions",
    "attention_widths",
    "detach_hypernetwork",
    "dropout_structure_for",
]

#: AUTOMATIC1111's activation names ("swish" is Hardswish there) plus, as it also accepts, every ``torch.nn``
#: activation by its lower-case class name (gelu, silu, mish, softplus, ...) that keeps the width and needs no
#: constructor argument (so not glu, softmax, threshold, multiheadattention).
_WIDTH_CHANGING = {"glu", "softmax", "softmax2d", "logsoftmax", "softmin", "multiheadattention", "threshold"}
ACTIVATIONS: dict[str, type[nn.Module]] = {
    name.lower(): cls
    for name, cls in inspect.getmembers(nn.modules.activation, inspect.isclass)
    if cls.__module__ == nn.modules.activation.__name__
    and issubclass(cls, nn.Module)
    and name.lower() not in _WIDTH_CHANGING
}
ACTIVATIONS.update(
    {
        "linear": nn.Identity,
        "relu": nn.ReLU,
        "leakyrelu": nn.LeakyReLU,
        "elu": nn.ELU,
        "swish": nn.Hardswish,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
)

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def _canonical_init(weight_init: str) -> str:
    for name in WEIGHT_INITS:
        if weight_init.replace("_", "").lower() == name.lower():
            return name
    raise ValueError(
        f"unknown hypernetwork weight_init {weight_init!r}; use one of {', '.join(WEIGHT_INITS)}"
    )


def _check_layer_structure(layer_structure: Sequence[float]) -> list[float]:
    structure = [float(x) for x in layer_structure]
    if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1 or any(x <= 0 for x in structure):
        raise ValueError(
            f"hypernetwork layer_structure {list(layer_structure)} must be positive width "
            "multipliers that start and end with 1, e.g. [1, 2, 1]"
        )
    return structure


def dropout_structure_for(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool, p: float = 0.3
) -> list[float]:
    """AUTOMATIC1111's rule: dropout ``p`` after every hidden layer but the last one (which gets it only with
    ``last_layer_dropout``), never after the input or the output; one entry per ``layer_structure`` entry."""
    n = len(layer_structure)
    if not use_dropout:
        return [0.0] * n
    return [0.0] + [p] * max(n - 3, 0) + ([p if last_layer_dropout else 0.0] if n >= 3 else []) + [0.0]


class HypernetworkMLP(nn.Module):
    """``x -> x + strength * linear(x)`` on ``[..., dim]`` (layout in the module docstring)."""

    def __init__(
        self,
        dim: int,
        layer_structure: Sequence[float] = (1, 2, 1),
        activation: str | None = "linear",
        weight_init: str = "Normal",
        layer_norm: bool = False,
        dropout_structure: Sequence[float] | None = None,
        activate_output: bool = False,
        zero_last_layer: bool = False,
    ):
        super().__init__()
        structure = _check_layer_structure(layer_structure)
        activation = (activation or "linear").lower()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown hypernetwork activation {activation!r}; use one of {', '.join(sorted(ACTIVATIONS))}"
            )
        dropouts = list(dropout_structure) if dropout_structure is not None else [0.0] * len(structure)
        if len(dropouts) != len(structure) or any(not 0 <= p < 1 for p in dropouts):
            raise ValueError(
                f"dropout_structure {dropouts} needs one probability in [0, 1) per layer_structure "
                f"entry ({len(structure)})"
            )
        self.strength = 1.0  # a plain float: not in state_dict (AUTOMATIC1111's files have no such key)
        layers: list[nn.Module] = []
        for i in range(len(structure) - 1):
            width_out = int(dim * structure[i + 1])
            layers.append(nn.Linear(int(dim * structure[i]), width_out))
            is_last = i == len(structure) - 2
            if activation != "linear" and (activate_output or not is_last):
                layers.append(ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(nn.LayerNorm(width_out))
            if dropouts[i + 1] > 0:
                layers.append(nn.Dropout(p=dropouts[i + 1]))
        self.linear = nn.Sequential(*layers)
        self.reset_parameters(_canonical_init(weight_init), activation, zero_last_layer)

    @torch.no_grad()
    def reset_parameters(self, weight_init: str, activation: str, zero_last_layer: bool) -> None:
        nonlinearity = "leaky_relu" if activation == "leakyrelu" else "relu"
        for layer in self.linear:
            if isinstance(layer, nn.LayerNorm) or (isinstance(layer, nn.Linear) and weight_init == "Normal"):
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            elif isinstance(layer, nn.Linear):
                init = {
                    "XavierUniform": nn.init.xavier_uniform_,
                    "XavierNormal": nn.init.xavier_normal_,
                    "KaimingUniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity=nonlinearity),
                    "KaimingNormal": lambda w: nn.init.kaiming_normal_(w, nonlinearity=nonlinearity),
                }
                init[weight_init](layer.weight)
            else:
                continue
            nn.init.zeros_(layer.bias)
        if zero_last_layer:
            last = [layer for layer in self.linear if isinstance(layer, nn.Linear)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return x
        return x + self.linear(x) * self.strength


class Hypernetwork(nn.Module):
    """A (key MLP, value MLP) pair per covered width: ``layers[str(width)] = ModuleList([mlp_k, mlp_v])``.

    ``options`` are the architecture (``layer_structure``, ``activation``, ``weight_init``, ``layer_norm``,
    ``dropout_structure``, ``activate_output``); files store them beside the weights.
    """

    def __init__(
        self,
        widths: Iterable[int],
        layer_structure: Sequence[float] = (1, 2, 1),
        activation: str | None = "linear",
        weight_init: str = "Normal",
        layer_norm: bool = False,
        dropout_structure: Sequence[float] | None = None,
        activate_output: bool = False,
        zero_last_layer: bool = False,
    ):
        super().__init__()
        widths = sorted({int(w) for w in widths})
        if not widths:
            raise ValueError("a hypernetwork needs at least one width (the attention K/V input widths)")
        structure = _check_layer_structure(layer_structure)
        self.options = {
            "layer_structure": [int(x) if x == int(x) else x for x in structure],
            "activation": (activation or "linear").lower(),
            "weight_init": _canonical_init(weight_init),
            "layer_norm": bool(layer_norm),
            "dropout_structure": [float(p) for p in dropout_structure or [0.0] * len(structure)],
            "activate_output": bool(activate_output),
        }
        mlp = dict(self.options, zero_last_layer=zero_last_layer)
        self.layers = nn.ModuleDict(
            {str(w): nn.ModuleList([HypernetworkMLP(w, **mlp), HypernetworkMLP(w, **mlp)]) for w in widths}
        )
        self._strength = 1.0

    @property
    def widths(self) -> list[int]:
        return sorted(int(w) for w in self.layers)

    def pair(self, width: int) -> tuple[HypernetworkMLP, HypernetworkMLP]:
        mlp_k, mlp_v = self.layers[str(width)]
        return mlp_k, mlp_v

    @property
    def strength(self) -> float:
        return self._strength

    @strength.setter
    def strength(self, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"hypernetwork strength must be a finite number, got {value}")
        self._strength = float(value)
        for pair in self.layers.values():
            for mlp in pair:
                mlp.strength = float(value)

    def set_strength(self, value: float) -> None:
        self.strength = value

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, M, w] -> (key input, value input); unchanged if ``w`` is not covered."""
        width = str(context.shape[-1])
        if width not in self.layers:
            return context, context
        mlp_k, mlp_v = self.layers[width]
        return mlp_k(context), mlp_v(context)


class _HypernetworkHook:
    """The ``context_transform`` installed on an attention. It holds the hypernetwork by weak reference so a
    deep copy of the UNet (EMA) shares the live hypernetwork instead of cloning a stale one."""

    def __init__(self, hypernetwork: Hypernetwork):
        self._ref = weakref.ref(hypernetwork)

    @property
    def hypernetwork(self) -> Hypernetwork:
        net = self._ref()
        if net is None:
            raise RuntimeError(
                "the hypernetwork attached to this UNet no longer exists; keep a reference to it "
                "(or call detach_hypernetwork) while the UNet is in use"
            )
        return net

    def __call__(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hypernetwork(context)


def _attentions(unet: nn.Module, self_attention: bool) -> list[tuple[str, CrossAttention]]:
    """Cross-attention layers (``*.attn2``), plus the self-attention ones when ``self_attention``."""
    return [
        (name, m)
        for name, m in unet.named_modules()
        if isinstance(m, CrossAttention) and (self_attention or name.rsplit(".", 1)[-1] == "attn2")
    ]


def attention_widths(unet: nn.Module, self_attention: bool = False) -> list[int]:
    """The K/V input widths of a UNet's cross-attention (text context width), plus self-attention widths."""
    return sorted({m.to_k.in_features for _, m in _attentions(unet, self_attention)})


def attach_hypernetwork(
    unet: nn.Module, hypernetwork: Hypernetwork, self_attention: bool = False
) -> list[str]:
    """Install ``hypernetwork`` on every attention of ``unet`` whose K/V input width it covers; returns their
    names. Replaces a hypernetwork attached before; raises if it covers no attention of this UNet."""
    detach_hypernetwork(unet)
    hook = _HypernetworkHook(hypernetwork)
    covered = set(hypernetwork.widths)
    names = []
    for name, attention in _attentions(unet, self_attention):
        if attention.to_k.in_features in covered:
            attention.context_transform = hook
            names.append(name)
    if not names:
        raise ValueError(
            f"the hypernetwork covers widths {hypernetwork.widths}, but this UNet's "
            f"{'' if self_attention else 'cross-'}attention K/V inputs are "
            f"{attention_widths(unet, self_attention)} wide: it was made for another model"
        )
    return names


def attached_attentions(unet: nn.Module) -> list[str]:
    return [
        name
        for name, m in unet.named_modules()
        if isinstance(m, CrossAttention) and isinstance(m.context_transform, _HypernetworkHook)
    ]


def detach_hypernetwork(unet: nn.Module) -> int:
    """Remove any hypernetwork from ``unet``'s attentions; returns how many were detached."""
    count = 0
    for _, m in unet.named_modules():
        if isinstance(m, CrossAttention) and isinstance(m.context_transform, _HypernetworkHook):
            m.context_transform = None
            count += 1
    return count
