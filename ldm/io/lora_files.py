"""What the LoRA file formats (kohya, PEFT) share: collecting the injected layers' tensors under the
format's names, and applying a file's entries to a model through ``ldm.modules.adapters.lora`` (attach a
LoRA layer holding them, or fold the delta into the weights)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ldm.io.diffusers_names import find_unet
from ldm.modules.adapters.lora import LoRALayer, attach_lora, invalidate_caches, lora_modules, merge_low_rank
from ldm.modules.unet import UNetModel

__all__ = ["apply_lora_tensors", "collect_lora_tensors", "metadata_str"]


def collect_lora_tensors(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    module_map: Callable[[UNetModel | None, nn.Module | None], Mapping[str, tuple[str, str]]],
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], list[LoRALayer]]:
    """``{file module name: (down, up, alpha)}`` for every LoRA layer, named by the file format's
    ``module_map(unet, text_encoder)`` (``{file module name: (component, module name)}``, e.g.
    ``kohya_module_map``), plus the layers themselves. ``unet`` may be any module holding one UNet."""
    if unet is None and text_encoder is None:
        raise ValueError("pass a unet and/or a text_encoder carrying LoRA layers")
    unet = None if unet is None else find_unet(unet)
    name_of = {v: k for k, v in module_map(unet, text_encoder).items()}
    entries: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    layers: list[LoRALayer] = []
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None:
            continue
        for name, layer in lora_modules(model).items():
            key = (component, name)
            if key not in name_of:
                raise KeyError(f"LoRA layer {component}.{name} has no name in the file format")
            if layer.algo != "lora":  # their other tensors would be lost
                raise ValueError(
                    f"{component}.{name} is a {layer.algo} adapter: save it with "
                    "ldm.io.lycoris_lora.save_lycoris_lora (or ldm.io.peft_dora.save_peft_dora for DoRA)"
                )
            entries[name_of[key]] = (layer.lora_down.weight, layer.lora_up.weight, layer.alpha)
            layers.append(layer)
    if not entries:
        raise ValueError("no LoRA layers to save: inject_lora into the unet and/or text encoder first")
    return entries, layers


def metadata_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _fit_shape(name: str, module: nn.Module, down: torch.Tensor, up: torch.Tensor):
    """Check and reshape down/up to the layout ``module`` needs ([r, in] / 4-D for convs)."""
    # Linear (or LoRALinear) weight [out, in]; Conv2d (or LoRAConv2d) weight [out, in, kh, kw].
    out_dim, in_dim, *kernel = module.weight.shape
    kernel = tuple(kernel)
    is_conv = module.weight.ndim == 4
    rank = down.shape[0]
    if is_conv:
        if down.ndim == 2 and kernel == (1, 1):
            down = down[:, :, None, None]
        if up.ndim == 2:
            up = up[:, :, None, None]
        expected_down, expected_up = (rank, in_dim, *kernel), (out_dim, rank, 1, 1)
    else:
        if down.ndim == 4 and down.shape[2:] == (1, 1):
            down = down[:, :, 0, 0]
        if up.ndim == 4 and up.shape[2:] == (1, 1):
            up = up[:, :, 0, 0]
        expected_down, expected_up = (rank, in_dim), (out_dim, rank)
    if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
        raise ValueError(
            f"LoRA {name}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not fit "
            f"{type(module).__name__} (expected {expected_down} / {expected_up})"
        )
    return down, up


def apply_lora_tensors(
    entries: Mapping[str, Mapping[str, torch.Tensor]],
    module_map: Mapping[str, tuple[str, str]],
    models: Mapping[str, nn.Module | None],
    multiplier: float = 1.0,
    merge: bool = False,
    strict: bool = True,
    source: str = "LoRA file",
    component_of: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Inject (or merge) LoRA entries ``{file module name: {"down", "up", ["alpha"]}}``.

    ``module_map``: ``{file module name: (component, module name)}``; ``models``: component ->
    module. ``merge=False`` wraps each target in a LoRA layer (rank/alpha from the entry) holding the
    weights, with ``multiplier`` set; ``merge=True`` adds ``multiplier * alpha/r * up @ down`` to the
    target's weight directly (no new modules; loading several files this way stacks them, and a
    second load with ``-multiplier`` takes one out again). ``strict``: entries whose module does not
    exist (or whose component was not given) raise ``KeyError``; otherwise they are skipped and listed.
    ``component_of``: file module name -> component (to tell "not given" from "unknown").
    """

    todo, skipped = _select_entries(entries, module_map, models, strict, source, component_of)
    plan = _plan(todo, entries, module_map, models, merge)  # validates everything before touching a module
    loaded = []
    for name, component, module_name, model, module, down, up, rank, alpha in plan:
        if merge:
            merge_low_rank(module, down, up, multiplier * alpha / rank)
        else:
            attach_lora(model, module_name, down, up, alpha=alpha, multiplier=multiplier)
        loaded.append((component, module_name, rank, alpha))
    for model in {id(m): m for m in models.values() if m is not None}.values():
        invalidate_caches(model)

    ranks = sorted({r for *_, r, _ in loaded})
    alphas = sorted({a for *_, a in loaded})
    return {
        "modules": len(loaded),
        "unet_modules": sum(c == "unet" for c, *_ in loaded),
        "text_encoder_modules": sum(c == "text_encoder" for c, *_ in loaded),
        "rank": ranks[0] if len(ranks) == 1 else ranks,
        "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "algo": ["lora"],
        "module_names": [f"{c}.{n}" for c, n, *_ in loaded],
        "skipped": skipped,
        "multiplier": float(multiplier),
        "merged": bool(merge),
    }


def _select_entries(
    entries: Mapping[str, Mapping[str, torch.Tensor]],
    module_map: Mapping[str, tuple[str, str]],
    models: Mapping[str, nn.Module | None],
    strict: bool,
    source: str,
    component_of: Callable[[str], str] | None,
) -> tuple[list[str], list[str]]:
    """(entries to apply, entries skipped); with ``strict`` an unknown or absent target raises."""

    def component(name: str) -> str | None:
        if component_of is not None:
            return component_of(name)
        return module_map[name][0] if name in module_map else None

    absent = [n for n in entries if (c := component(n)) is not None and models.get(c) is None]
    unknown = [n for n in entries if n not in module_map and n not in absent]
    if strict and unknown:
        raise KeyError(
            f"{source}: {len(unknown)} of {len(entries)} LoRA modules map to no module of the given "
            f"model(s), e.g. {unknown[:5]}"
        )
    if strict and absent:
        components = sorted({component(n) for n in absent})
        raise KeyError(
            f"{source} has LoRA modules for {components} but none was given "
            f"(pass it, or strict=False to skip them), e.g. {absent[:3]}"
        )
    skipped = unknown + absent
    todo = [n for n in entries if n not in skipped]
    if not todo:
        raise KeyError(f"{source}: no LoRA module of the file applies to the given model(s)")
    targets = Counter(module_map[n] for n in todo)
    duplicates = [f"{c}.{m}" for (c, m), count in targets.items() if count > 1]
    if duplicates:
        raise ValueError(f"{source}: several entries target the same module, e.g. {duplicates[:5]}")
    return todo, skipped


def _plan(
    todo: list[str],
    entries: Mapping[str, Mapping[str, torch.Tensor]],
    module_map: Mapping[str, tuple[str, str]],
    models: Mapping[str, nn.Module | None],
    merge: bool,
) -> list[tuple]:
    """(name, component, module name, model, module, down, up, rank, alpha) per entry, shapes checked."""
    plan = []
    for name in todo:
        component, module_name = module_map[name]
        model = models[component]
        module = model.get_submodule(module_name)
        if not merge and isinstance(module, LoRALayer):
            raise ValueError(
                f"{component}.{module_name} already carries a LoRA: remove_lora() first, or load with "
                "merge=True to stack files"
            )
        down, up = _fit_shape(name, module, entries[name]["down"], entries[name]["up"])
        rank = down.shape[0]
        alpha = float(entries[name]["alpha"].float()) if "alpha" in entries[name] else float(rank)
        plan.append((name, component, module_name, model, module, down, up, rank, alpha))
    return plan
