"""diffusers / PEFT-format LoRA files (what ``pipeline.save_lora_weights`` writes and
``pipeline.load_lora_weights`` reads).

Keys: ``unet.<diffusers UNet module path>.lora_A.weight`` [r, in] (conv: [r, in, kh, kw]) and
``.lora_B.weight`` [out, r] (conv: [out, r, 1, 1]); text encoder
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight``. PEFT scales the delta
by ``lora_alpha / r`` from its config; to be exact for every diffusers version (with or without the
``lora_adapter_metadata`` entry), ``save_peft_lora`` folds our ``alpha / rank`` into ``lora_B`` and
writes no alpha, so the file reads with PEFT's default ``lora_alpha = r`` (scale 1).
``load_peft_lora`` reads such files, and files with diffusers' ``lora_adapter_metadata`` (``r``,
``lora_alpha``, ``alpha_pattern``, ``use_rslora`` per component prefix).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.io.adapter_files import apply_adapter_tensors
from ldm.io.diffusers_names import find_unet, text_encoder_module_names, unet_module_names
from ldm.io.lora_files import apply_lora_tensors, collect_lora_tensors, metadata_str
from ldm.io.safe_load import load_safetensors_file, read_safetensors_metadata
from ldm.utils.files import atomic_save_safetensors

__all__ = ["load_peft_lora", "peft_module_map", "save_peft_lora"]

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
_PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_magnitude_vector": "dora_scale"}


def peft_module_map(unet: nn.Module | None = None, text_encoder: nn.Module | None = None) -> dict:
    """``{"unet.<diffusers path>" | "text_encoder.<CLIP path>": (component, module name)}``; UNet
    module names are relative to the ``UNetModel``; text-encoder paths in both spellings (transformers 4
    ``text_model.encoder.layers...``, transformers 5 ``encoder.layers...``)."""
    mapping: dict[str, tuple[str, str]] = {}
    if unet is not None:
        for ours, theirs in unet_module_names(unet).items():
            mapping[f"unet.{theirs}"] = ("unet", ours)
    if text_encoder is not None:
        for ours, theirs in text_encoder_module_names(text_encoder).items():
            # transformers 5's CLIPTextModel has no text_model level: diffusers then saves encoder.layers...
            mapping[f"text_encoder.{theirs.removeprefix('text_model.')}"] = ("text_encoder", ours)
            mapping[f"text_encoder.{theirs}"] = ("text_encoder", ours)  # last: the spelling we write
    return mapping


def save_peft_lora(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the injected LoRA layers in diffusers' PEFT format (``alpha / rank`` folded into
    ``lora_B``). Loads with ``pipeline.load_lora_weights(path)`` (needs ``peft``) or
    ``load_peft_lora``. ``metadata``: extra str -> str entries. Returns the path."""
    path = Path(path)
    entries, _ = collect_lora_tensors(unet, text_encoder, peft_module_map)
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up, alpha) in entries.items():
        rank = down.shape[0]
        up = up.detach().float() * (alpha / rank)
        down = down.detach()
        out_dtype = dtype or down.dtype
        tensors[f"{name}.lora_A.weight"] = down.to(out_dtype).cpu().contiguous()
        tensors[f"{name}.lora_B.weight"] = up.to(out_dtype).cpu().contiguous()
    info = {"format": "pt", **{str(k): metadata_str(v) for k, v in (metadata or {}).items()}}
    atomic_save_safetensors(tensors, path, info)
    return path


def _pattern_value(patterns: Mapping[str, Any], module: str):
    """PEFT's pattern lookup: a key matches when it equals the module name or its dotted suffix."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def load_peft_lora(
    path: str | os.PathLike | Mapping[str, torch.Tensor],
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    multiplier: float = 1.0,
    merge: bool = False,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Apply a diffusers/PEFT LoRA file (or tensor dict) to ``unet`` / ``text_encoder``; same
    semantics and summary as ``ldm.io.kohya_lora.load_kohya_lora`` (inject, or ``merge`` to fold). A file with
    ``lora_magnitude_vector`` entries is DoRA (``ldm.modules.adapters.dora``)."""
    if unet is None and text_encoder is None:
        raise ValueError("pass a unet and/or a text_encoder to load the LoRA into")
    unet = None if unet is None else find_unet(unet)
    if isinstance(path, Mapping):
        tensors, metadata, source = dict(path), {}, "LoRA state dict"
    else:
        metadata = read_safetensors_metadata(path)  # first: names a damaged file
        tensors, source = load_safetensors_file(path), str(path)
    config = json.loads(metadata[LORA_ADAPTER_METADATA_KEY]) if LORA_ADAPTER_METADATA_KEY in metadata else {}

    entries: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, value in tensors.items():
        match = re.fullmatch(
            r"((unet|text_encoder)\..+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)", key
        )
        if match is None:
            unsupported.append(key)
            continue
        entries.setdefault(match[1], {})[_PEFT_PARTS[match[3]]] = value
    if unsupported:
        raise KeyError(
            f"{source}: {len(unsupported)} keys are not PEFT LoRA keys "
            f"(unet.* / text_encoder.* ending in .lora_A.weight / .lora_B.weight), e.g. {unsupported[:5]}"
        )
    incomplete = [n for n, g in entries.items() if "down" not in g or "up" not in g]
    if incomplete:
        raise ValueError(f"{source}: {len(incomplete)} modules lack lora_A or lora_B, e.g. {incomplete[:5]}")

    for name, entry in entries.items():
        component, _, module = name.partition(".")
        rank = entry["down"].shape[0]
        lora_alpha = config.get(f"{component}.lora_alpha")
        pattern_alpha = _pattern_value(config.get(f"{component}.alpha_pattern") or {}, module)
        peft_alpha = pattern_alpha if pattern_alpha is not None else lora_alpha
        if peft_alpha is None:
            continue  # PEFT default: lora_alpha = r, scale 1 -> alpha = rank
        scale = peft_alpha / (math.sqrt(rank) if config.get(f"{component}.use_rslora") else rank)
        entry["alpha"] = torch.tensor(scale * rank)

    dora = any("dora_scale" in entry for entry in entries.values())  # DoRA: lora_magnitude_vector
    if dora:
        names = {
            "down": "lora_down.weight",
            "up": "lora_up.weight",
            "dora_scale": "dora_scale",
            "alpha": "alpha",
        }
        entries = {n: {names[k]: v for k, v in entry.items()} for n, entry in entries.items()}
    summary = (apply_adapter_tensors if dora else apply_lora_tensors)(
        entries,
        peft_module_map(unet, text_encoder),
        {"unet": unet, "text_encoder": text_encoder},
        multiplier=multiplier,
        merge=merge,
        strict=strict,
        source=source,
        component_of=lambda n: n.partition(".")[0],
    )
    summary["metadata"] = metadata
    return summary
