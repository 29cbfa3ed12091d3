"""Adapter files of any algorithm (LoRA, LoHa, LoKr, DoRA; ``ldm.modules.adapters.algorithms``): collect the
injected layers' tensors under a file format's module names, and apply a file's entries to a model (inject
adapter layers holding them, or fold their deltas into the weights). Entries use the LyCORIS tensor names
(``lora_down.weight``, ``hada_w1_a``, ``lokr_w2``, ``dora_scale``...) plus an optional 0-d ``alpha``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ldm.io.diffusers_names import find_unet
from ldm.io.lora_files import _select_entries
from ldm.modules.adapters.algorithms import algo_of_tensors, layer_from_tensors
from ldm.modules.adapters.lora import LoRALayer, _set_submodule, invalidate_caches, lora_modules

__all__ = ["apply_adapter_tensors", "collect_adapter_layers"]


def collect_adapter_layers(
    unet: nn.Module | None, text_encoder: nn.Module | None, module_map: Callable
) -> dict[str, LoRALayer]:
    """``{file module name: adapter layer}`` for every adapter layer of ``unet`` / ``text_encoder``, named by
    ``module_map(unet, text_encoder)`` (``{file module name: (component, module name)}``)."""
    if unet is None and text_encoder is None:
        raise ValueError("pass a unet and/or a text_encoder carrying adapter layers")
    unet = None if unet is None else find_unet(unet)
    name_of = {v: k for k, v in module_map(unet, text_encoder).items()}
    layers: dict[str, LoRALayer] = {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        for name, layer in ({} if model is None else lora_modules(model)).items():
            if (component, name) not in name_of:
                raise KeyError(f"adapter layer {component}.{name} has no name in the file format")
            layers[name_of[(component, name)]] = layer
    if not layers:
        raise ValueError("no adapter layers to save: attach them to the unet and/or text encoder first")
    return layers


def _base_of(module: nn.Module) -> nn.Module:
    """A plain Linear / Conv2d sharing ``module``'s Parameters (``module`` itself unless it is an adapter)."""
    if not isinstance(module, LoRALayer):
        return module
    plain = module._plain_module()
    plain.weight, plain.bias = module.weight, module.bias
    return plain


def _build(name, component, module_name, models, entry, merge, source):
    module = models[component].get_submodule(module_name)
    if not merge and isinstance(module, LoRALayer):
        raise ValueError(
            f"{component}.{module_name} already carries an adapter: remove_lora() first, or load with "
            "merge=True to stack files"
        )
    tensors = {k: v for k, v in entry.items() if k != "alpha"}
    alpha = float(entry["alpha"].float()) if "alpha" in entry else None
    try:
        algo = algo_of_tensors(set(tensors))
        return algo, layer_from_tensors(_base_of(module) if merge else module, tensors, alpha, algo)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        raise ValueError(f"{source}: module {name}: {err}") from None


def apply_adapter_tensors(
    entries: Mapping[str, Mapping[str, torch.Tensor]],
    module_map: Mapping[str, tuple[str, str]],
    models: Mapping[str, nn.Module | None],
    multiplier: float = 1.0,
    merge: bool = False,
    strict: bool = True,
    source: str = "adapter file",
    component_of: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Inject (or, ``merge``, fold in) adapter entries ``{file module name: {tensor name: tensor}}``;
    semantics and summary as ``ldm.io.lora_files.apply_lora_tensors``, plus ``algo`` (the algorithms found).
    Every entry is built (and checked) before any module changes."""
    todo, skipped = _select_entries(entries, module_map, models, strict, source, component_of)
    plan = []
    for name in todo:
        component, module_name = module_map[name]
        algo, layer = _build(name, component, module_name, models, entries[name], merge, source)
        plan.append((component, module_name, algo, layer))
    for component, module_name, _, layer in plan:
        layer.multiplier = multiplier
        if merge:
            layer.to_base(merge=True)  # folds into the shared Parameters; the model keeps its module
        else:
            _set_submodule(models[component], module_name, layer)
    for model in {id(m): m for m in models.values() if m is not None}.values():
        invalidate_caches(model)
    ranks = sorted({layer.rank for *_, layer in plan})
    alphas = sorted({layer.alpha for *_, layer in plan})
    return {
        "modules": len(plan),
        "unet_modules": sum(c == "unet" for c, *_ in plan),
        "text_encoder_modules": sum(c == "text_encoder" for c, *_ in plan),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "algo": sorted({algo for _, _, algo, _ in plan}),
        "module_names": [f"{c}.{n}" for c, n, *_ in plan],
        "skipped": skipped,
        "multiplier": float(multiplier),
        "merged": bool(merge),
    }
