"""LoRA on whole models: inject LoRA layers (``lora_layers``) by module-name patterns, read and load their
weights, attach or fold the deltas a LoRA file holds, merge, set the strength, remove.

Target patterns (``inject_lora(targets=...)``) are matched against qualified module names from
``model.named_modules()``: a plain pattern is an ``fnmatch`` glob over the whole name (``*`` also
crosses dots, ``[qkv]`` is a character class); a pattern starting with ``re:`` is a regular
expression that must match the whole name (``re.fullmatch``). Matching modules that are not
``nn.Linear`` / ``nn.Conv2d`` (containers, norms) are skipped; a pattern list that matches no layer
raises. The presets below use LDM UNet names (``ldm/modules/unet.py``) and transformers CLIP names.
``lora_state_dict`` exports ``alpha`` as a 0-d tensor next to the weights. ``remove_lora`` puts plain
``nn.Linear`` / ``nn.Conv2d`` modules back holding the same Parameters.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ldm.modules.adapters.lora_layers import (
    LoRAConv2d,
    LoRALayer,
    LoRALinear,
    low_rank_product,
    make_lora_layer,
)

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
    "attach_lora",
    "inject_lora",
    "invalidate_caches",
    "load_lora_state_dict",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "make_lora_layer",
    "match_targets",
    "merge_lora",
    "merge_low_rank",
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


def invalidate_caches(model: nn.Module) -> None:
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
    factory: Callable[[nn.Module], LoRALayer] | None = None,
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
        factory: builds the adapter layer for a base module instead of ``make_lora_layer`` (other
            algorithms, per-kind ranks: ``ldm.modules.adapters.algorithms.adapter_factory``).

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
        base = model.get_submodule(name)
        layer = factory(base) if factory else make_lora_layer(base, rank, alpha, dropout, lora_dtype)
        _set_submodule(model, name, layer)
        injected[name] = layer
    if freeze_base:
        adapter = {id(p) for p in lora_parameters(model)}
        for p in model.parameters():
            if id(p) not in adapter:
                p.requires_grad_(False)
    invalidate_caches(model)
    return injected


def lora_modules(model: nn.Module) -> dict[str, LoRALayer]:
    """``{qualified name: LoRA layer}`` of every LoRA layer in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters only (every ``lora_down`` / ``lora_up`` weight), for the optimiser."""
    params: list[nn.Parameter] = []
    for layer in lora_modules(model).values():
        params.extend(layer.adapter_parameters())
    return params


def lora_state_dict(model: nn.Module, include_alpha: bool = True) -> dict[str, torch.Tensor]:
    """Adapter tensors only, under the model's own names: ``<module>.lora_down.weight``,
    ``<module>.lora_up.weight`` (other algorithms: their ``adapter_tensors`` names, e.g. ``hada_w1_a``,
    ``dora_scale``) and (``include_alpha``) ``<module>.alpha`` (0-d float32)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_modules(model).items():
        for suffix, tensor in layer.adapter_tensors().items():
            out[f"{name}.{suffix}"] = tensor.detach()
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
    expected = {f"{n}.{suffix}" for n, layer in layers.items() for suffix in layer.adapter_tensors()}
    unexpected = [k for k in state_dict if k not in expected and k.removesuffix(".alpha") not in layers]
    missing = sorted(expected - set(state_dict))
    if unexpected or missing:
        raise KeyError(f"LoRA state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, layer in layers.items():
        was_merged = layer.merged
        layer.unmerge()
        for suffix, tensor in layer.adapter_tensors().items():
            tensor.copy_(state_dict[f"{name}.{suffix}"])
        if f"{name}.alpha" in state_dict:
            layer.alpha = float(state_dict[f"{name}.alpha"])
        if was_merged:
            layer.merge()
    invalidate_caches(model)


def set_lora_multiplier(model: nn.Module, value: float) -> None:
    """Set the inference multiplier of every LoRA layer (merged layers are re-merged)."""
    for layer in lora_modules(model).values():
        layer.multiplier = value
    invalidate_caches(model)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA delta (times its multiplier) into the base weights (fast inference)."""
    for layer in lora_modules(model).values():
        layer.merge()
    invalidate_caches(model)


def unmerge_lora(model: nn.Module) -> None:
    """Undo ``merge_lora`` (base weights back to their values before merging)."""
    for layer in lora_modules(model).values():
        layer.unmerge()
    invalidate_caches(model)


def remove_lora(model: nn.Module, merge: bool = False) -> list[str]:
    """Replace every LoRA layer by a plain ``nn.Linear`` / ``nn.Conv2d`` holding its base Parameters.

    ``merge=True`` keeps the deltas (times their multipliers) in the weights; ``merge=False``
    restores the original weights. Either way ``model.state_dict()`` has the original key set.
    Returns the names of the replaced modules.
    """
    layers = lora_modules(model)
    for name, layer in layers.items():
        _set_submodule(model, name, layer.to_base(merge=merge))
    invalidate_caches(model)
    return list(layers)


def attach_lora(
    model: nn.Module,
    name: str,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float | None = None,
    multiplier: float = 1.0,
) -> LoRALayer:
    """Wrap module ``name`` of ``model`` in a LoRA layer of rank ``down.shape[0]`` holding ``down``/``up``
    (shaped as the layer's ``lora_down``/``lora_up`` weights) with inference strength ``multiplier``.
    Cached text encodings are not cleared here; call ``invalidate_caches`` when done."""
    layer = make_lora_layer(model.get_submodule(name), rank=down.shape[0], alpha=alpha)
    with torch.no_grad():
        layer.lora_down.weight.copy_(down)
        layer.lora_up.weight.copy_(up)
    layer.multiplier = multiplier
    _set_submodule(model, name, layer)
    return layer


@torch.no_grad()
def merge_low_rank(module: nn.Module, down: torch.Tensor, up: torch.Tensor, factor: float) -> None:
    """Fold ``factor * up @ down`` (computed in float32) into ``module.weight`` in place, adding no module:
    how a LoRA file's delta is merged (``factor = multiplier * alpha / rank``); ``-factor`` takes it out."""
    weight = module.weight
    delta = (factor * low_rank_product(up, down)).view(weight.shape).to(weight.device)
    weight.copy_(weight.float() + delta)
