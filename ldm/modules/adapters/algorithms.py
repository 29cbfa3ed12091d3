"""The adapter algorithms by name (``lora``, ``locon``, ``loha``, ``lokr``, ``dora``): a layer factory for
``inject_lora(factory=...)`` with separate ranks for 3x3 convolutions (kohya's ``conv_dim`` / ``conv_alpha``),
and the layer a file's tensors describe (``layer_from_tensors``), telling the algorithm from the tensor names.

LoCon is LoRA whose targets include the 3x3 convolutions (kohya ``networks.lora`` with ``conv_dim``); it
builds the same layers as ``lora``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ldm.modules.adapters.dora import DoRAConv2d, DoRALinear, make_dora_layer
from ldm.modules.adapters.loha import LOHA_KEYS, LoHaLayer
from ldm.modules.adapters.lokr import LOKR_KEYS, LoKrLayer
from ldm.modules.adapters.lora_layers import LoRALayer, make_lora_layer

__all__ = ["ALGORITHMS", "adapter_factory", "algo_of_tensors", "is_conv_kernel", "layer_from_tensors"]

ALGORITHMS = ("lora", "locon", "loha", "lokr", "dora")


def is_conv_kernel(module: nn.Module) -> bool:
    """True for convolutions with a kernel larger than 1x1 (they take ``conv_rank`` / ``conv_alpha``)."""
    return module.weight.ndim == 4 and tuple(module.weight.shape[2:]) != (1, 1)


def adapter_factory(
    algo: str = "lora",
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    factor: int = -1,
    decompose_both: bool = False,
    full_matrix: bool = False,
) -> Callable[[nn.Module], LoRALayer]:
    """``base -> adapter layer`` of ``algo``; 3x3 convs get ``conv_rank`` / ``conv_alpha`` (default: ``rank``
    / ``alpha``). ``factor``, ``decompose_both``, ``full_matrix``: LoKr's (``ldm.modules.adapters.lokr``)."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown adapter algorithm {algo!r}; choose one of {', '.join(ALGORITHMS)}")

    def build(base: nn.Module) -> LoRALayer:
        conv = is_conv_kernel(base)
        r = (conv_rank or rank) if conv else rank
        a = (
            (conv_alpha if conv_alpha is not None else alpha if conv_rank is None else conv_rank)
            if conv
            else alpha
        )
        if algo in ("lora", "locon"):
            return make_lora_layer(base, r, a, dropout)
        if algo == "dora":
            return make_dora_layer(base, r, a, dropout)
        if algo == "loha":
            return LoHaLayer(base, r, a, dropout)
        return LoKrLayer(
            base, r, a, dropout, factor=factor, decompose_both=decompose_both, full_matrix=full_matrix
        )

    return build


# Tensor names of the LyCORIS algorithms we do not read, to name them in errors.
OTHER_ALGOS = {
    "hada_t1": "loha with Tucker decomposition (use_tucker)",
    "lokr_t2": "lokr with Tucker decomposition (use_tucker)",
    "lora_mid.weight": "locon with Tucker decomposition (use_tucker)",
    "diff": "full (a full weight difference)",
    "a1.weight": "glora",
    "on_input": "ia3",
    "oft_blocks": "diag-oft / boft",
    "oft_diag": "diag-oft",
    "w_norm": "norms (LayerNorm / GroupNorm)",
}
READ = "lora/locon (lora_down/lora_up), loha (hada_w*), lokr (lokr_w*), dora (lora_* + dora_scale)"


def algo_of_tensors(keys: set[str]) -> str:
    """The algorithm of one module's tensors (names without the module prefix); ``ValueError`` naming the
    algorithm for the LyCORIS ones we do not read."""
    keys = set(keys) - {"alpha"}
    other = next((what for key, what in OTHER_ALGOS.items() if key in keys), None)
    if other is not None:
        raise ValueError(f"LyCORIS algorithm {other} is not read; we read {READ}")
    if keys <= {"lora_down.weight", "lora_up.weight"} and len(keys) == 2:
        return "lora"
    if keys == {"lora_down.weight", "lora_up.weight", "dora_scale"}:
        return "dora"
    if keys == set(LOHA_KEYS):
        return "loha"
    lokr_ok = ({"lokr_w1"} <= keys or {"lokr_w1_a", "lokr_w1_b"} <= keys) and (
        {"lokr_w2"} <= keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
    )
    if keys <= set(LOKR_KEYS) and lokr_ok:
        return "lokr"
    if "dora_scale" in keys:
        raise ValueError(
            f"LyCORIS weight decomposition (dora_scale) on loha/lokr is not read; we read {READ}"
        )
    raise ValueError(f"tensors {sorted(keys)} are no adapter algorithm we read; we read {READ}")


def layer_from_tensors(
    base: nn.Module, tensors: Mapping[str, torch.Tensor], alpha: float | None, algo: str | None = None
) -> LoRALayer:
    """The adapter layer around ``base`` holding a file's ``tensors`` (LyCORIS names, module prefix
    removed); ``algo`` defaults to ``algo_of_tensors``. Plain LoRA down/up must already fit ``base``."""
    algo = algo or algo_of_tensors(set(tensors))
    if algo == "loha":
        return LoHaLayer.from_tensors(base, tensors, alpha)
    if algo == "lokr":
        return LoKrLayer.from_tensors(base, tensors, alpha)
    if algo == "dora":
        cls = DoRALinear if isinstance(base, nn.Linear) else DoRAConv2d
        return cls.from_tensors(base, tensors, alpha)
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    layer = make_lora_layer(base, rank=down.shape[0], alpha=alpha)
    with torch.no_grad():
        layer.lora_down.weight.copy_(down.reshape(layer.lora_down.weight.shape))
        layer.lora_up.weight.copy_(up.reshape(layer.lora_up.weight.shape))
    return layer
