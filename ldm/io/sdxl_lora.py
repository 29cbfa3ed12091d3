"""SDXL LoRA files: one UNet and two text encoders (CLIP-L, then OpenCLIP bigG with its projection).

Two layouts, written by ``save_sdxl_lora`` and read by ``load_sdxl_lora``:

* kohya (sd-scripts' SDXL networks; AUTOMATIC1111, ComfyUI, diffusers' ``load_lora_weights`` read it):
  ``lora_unet_<module>`` with the UNet's original (sgm) module names, which are ours
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``; the diffusers-named spelling
  ``lora_unet_down_blocks_...`` is read too), ``lora_te1_<transformers path>`` for CLIP-L and
  ``lora_te2_<transformers path>`` for bigG (``lora_te2_text_model_encoder_layers_0_self_attn_q_proj``);
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` per module; metadata
  ``ss_base_model_version: sdxl_base_v1-0``, ``modelspec.architecture: stable-diffusion-xl-v1-base/lora``.
* diffusers / PEFT (``StableDiffusionXLPipeline.save_lora_weights`` / ``load_lora_weights``):
  ``unet.<diffusers UNet path>``, ``text_encoder.<transformers path>``,
  ``text_encoder_2.<transformers path>``, each ``.lora_A.weight`` / ``.lora_B.weight``, ``alpha / rank``
  folded into ``lora_B`` (as ``ldm.io.peft_lora``).

Every adapter algorithm (``ldm.modules.adapters.algorithms``) in the kohya layout: LoHa / LoKr / DoRA layers
are written with the LyCORIS tensor names (``hada_w1_a``..., ``lokr_w1``..., ``dora_scale``; see
``ldm.io.lycoris_lora``) and its metadata (``ss_network_module: lycoris.kohya``, ``ss_network_args``), as
kohya's sd-scripts with ``--network_module lycoris.kohya`` writes them for SDXL; DoRA also in the PEFT layout
(``<module>.lora_magnitude_vector`` beside ``lora_A`` / ``lora_B``).

A file of the other family (an SD 1.x/2.x LoRA: ``lora_te_*`` keys, ``ss_base_model_version: sd_v1``) is one
clear error naming what it is and what fits.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.io.adapter_files import apply_adapter_tensors
from ldm.io.bundled_embeddings import BUNDLE_PREFIX
from ldm.io.diffusers_names import find_unet, text_encoder_module_names, unet_module_names
from ldm.io.kohya_lora import _SUFFIXES, _format_number, _group_entries, _tensor_data_hash
from ldm.io.lora_files import apply_lora_tensors, metadata_str
from ldm.io.lycoris_lora import _check_network, lycoris_metadata
from ldm.io.peft_lora import _PEFT_PARTS, LORA_ADAPTER_METADATA_KEY, _pattern_value
from ldm.io.safe_load import load_safetensors_file, read_safetensors_metadata
from ldm.modules.adapters.algorithms import is_conv_kernel
from ldm.modules.adapters.lora import lora_modules
from ldm.utils.files import atomic_save_safetensors

__all__ = ["SDXL_BASE_VERSION", "is_sdxl_lora", "load_sdxl_lora", "save_sdxl_lora", "sdxl_module_map"]

SDXL_BASE_VERSION = "sdxl_base_v1-0"
SDXL_LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
FITS = (
    "an SDXL LoRA (kohya lora_unet_* + lora_te1_*/lora_te2_*, ss_base_model_version sdxl_base_v1-0; or "
    "diffusers unet.* / text_encoder.* / text_encoder_2.*)"
)


def sdxl_module_map(parts: Mapping[str, nn.Module], layout: str) -> dict[str, tuple[str, str]]:
    """``{file module name: (component, module name)}`` for ``parts`` (``unet``, ``text_encoder``,
    ``text_encoder_2``); the first name per module is the one written, the others are read too."""
    mapping: dict[str, tuple[str, str]] = {}
    for component, module in parts.items():
        if component == "unet":
            names = unet_module_names(module)
            for ours, theirs in names.items():
                if layout == "kohya":
                    mapping[KOHYA_PREFIX["unet"] + ours.replace(".", "_")] = ("unet", ours)
                    mapping.setdefault(KOHYA_PREFIX["unet"] + theirs.replace(".", "_"), ("unet", ours))
                else:
                    mapping[f"unet.{theirs}"] = ("unet", ours)
            continue
        for ours, theirs in text_encoder_module_names(module).items():
            if layout == "kohya":
                mapping[KOHYA_PREFIX[component] + theirs.replace(".", "_")] = (component, ours)
            else:
                mapping[f"{component}.{theirs}"] = (component, ours)
                mapping.setdefault(f"{component}.{theirs.removeprefix('text_model.')}", (component, ours))
    return mapping


# ------------------------------------------------------------------------------------------ saving


def _metadata(layers, tensors, path: Path, layout: str, factor: int | None) -> dict[str, str]:
    def most_common(values):
        return Counter(values).most_common(1)[0][0]

    common = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": SDXL_LORA_ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": path.stem,
        "ss_base_model_version": SDXL_BASE_VERSION,
    }
    if layout == "peft":
        return {"format": "pt", **common}
    convs = [layer for *_, layer in layers if is_conv_kernel(layer)]  # LoCon: kohya's conv_dim / conv_alpha
    plain = [layer for *_, layer in layers if not is_conv_kernel(layer)] or convs
    network = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(most_common(layer.rank for layer in plain)),
        "ss_network_alpha": str(float(most_common(layer.alpha for layer in plain))),
    }
    if convs:
        conv_alpha = _format_number(most_common(layer.alpha for layer in convs))
        network["ss_network_args"] = json.dumps(
            {"conv_dim": str(most_common(layer.rank for layer in convs)), "conv_alpha": conv_alpha}
        )
    if any(layer.algo != "lora" for *_, layer in layers):  # LoHa / LoKr / DoRA: LyCORIS's network
        network = lycoris_metadata({key: layer for _, key, layer in layers}, factor)
    return {
        **common,
        **network,
        "ss_v2": "False",
        "ss_output_name": path.stem,
        "ss_training_comment": "",
        "ss_network_train_unet_only": str(all(c == "unet" for c, *_ in layers)),
        "sshs_model_hash": _tensor_data_hash(tensors),
    }


def _layer_tensors(key: str, layer, layout: str) -> dict[str, torch.Tensor]:
    """One adapter layer's tensors under the file names (kohya: LyCORIS names; PEFT: ``alpha / rank`` folded
    into ``lora_B``, DoRA's magnitude as ``lora_magnitude_vector``); ``alpha`` is the caller's."""
    if layout == "kohya":
        return {f"{key}.{suffix}": value for suffix, value in layer.adapter_tensors().items()}
    if layer.algo not in ("lora", "dora"):
        raise ValueError(f"{key}: a {layer.algo} adapter has no PEFT layout; save it with layout='kohya'")
    out = {
        f"{key}.lora_A.weight": layer.lora_down.weight,
        f"{key}.lora_B.weight": layer.lora_up.weight.float() * layer.scale,
    }
    if layer.algo == "dora":
        if layer.dora_scale.numel() != layer.weight.shape[0]:
            raise ValueError(f"{key}: the PEFT DoRA layout holds output-axis DoRA layers only")
        out[f"{key}.lora_magnitude_vector"] = layer.dora_scale.reshape(-1)
    return out


def save_sdxl_lora(
    path: str | os.PathLike,
    parts: Mapping[str, nn.Module],
    metadata: Mapping[str, Any] | None = None,
    layout: str = "kohya",
    *,
    dtype: torch.dtype | None = None,
    factor: int | None = None,
) -> Path:
    """Write the adapter layers injected into ``parts`` (``{"unet": ..., "text_encoder": ...,
    "text_encoder_2": ...}``, any subset) in the kohya or PEFT layout (module docstring), atomically.
    ``metadata`` entries (stringified) win over the computed ones; ``factor``: LoKr's, recorded in
    ``ss_network_args``."""
    if layout not in ("kohya", "peft"):
        raise ValueError(f"SDXL LoRA layout must be 'kohya' or 'peft', got {layout!r}")
    path = Path(path)
    parts = {k: (find_unet(v) if k == "unet" else v) for k, v in parts.items() if v is not None}
    name_of: dict[tuple[str, str], str] = {}
    for key, target in sdxl_module_map(parts, layout).items():
        name_of.setdefault(target, key)  # the first name of a module is the one written
    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for component, module in parts.items():
        for name, layer in lora_modules(module).items():
            key = name_of[(component, name)]
            out_dtype = dtype or next(iter(layer.adapter_tensors().values())).dtype
            for tensor_name, value in _layer_tensors(key, layer, layout).items():
                tensors[tensor_name] = value.detach().to(out_dtype).cpu().contiguous()
            if layout == "kohya":
                tensors[f"{key}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
            layers.append((component, key, layer))
    if not layers:
        raise ValueError("no LoRA layers to save: inject_lora into the unet and/or text encoders first")
    info = _metadata(layers, tensors, path, layout, factor)
    info.update({str(k): metadata_str(v) for k, v in (metadata or {}).items()})
    return atomic_save_safetensors(tensors, path, info)


# ------------------------------------------------------------------------------------------ loading


def is_sdxl_lora(keys, metadata: Mapping[str, str]) -> bool:
    """Whether a LoRA file is for SDXL: its metadata says so, or it has keys only SDXL files have."""
    version = str(metadata.get("ss_base_model_version", "")) + str(metadata.get("modelspec.architecture", ""))
    return (
        "sdxl" in version
        or "xl-v1" in version
        or any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys)
    )


def _refuse_other_family(keys, metadata: Mapping[str, str], source: str) -> None:
    version = metadata.get("ss_base_model_version", "")
    sd1_keys = [k for k in keys if k.startswith("lora_te_")]
    if sd1_keys or version.startswith("sd_v") or metadata.get("ss_v2") == "True":
        found = f"ss_base_model_version {version!r}" if version else f"keys like {sd1_keys[0]!r}"
        raise ValueError(
            f"{source} is an SD 1.x/2.x LoRA ({found}); this base is SDXL, which takes {FITS}. "
            "Use it with an SD 1.x/2.x base, or pick an SDXL LoRA"
        )


def _peft_entries(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> dict:
    config = json.loads(metadata[LORA_ADAPTER_METADATA_KEY]) if LORA_ADAPTER_METADATA_KEY in metadata else {}
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = re.fullmatch(
            r"((unet|text_encoder|text_encoder_2)\..+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)",
            key,
        )
        if match is None:
            raise KeyError(f"{source}: {key!r} is not a diffusers SDXL LoRA key ({FITS})")
        entries.setdefault(match[1], {})[_PEFT_PARTS[match[3]]] = value
    for name, entry in entries.items():
        if "down" not in entry or "up" not in entry:
            raise ValueError(f"{source}: module {name} lacks lora_A or lora_B")
        component, _, module = name.partition(".")
        pattern = _pattern_value(config.get(f"{component}.alpha_pattern") or {}, module)
        alpha = pattern if pattern is not None else config.get(f"{component}.lora_alpha")
        if alpha is not None:  # else PEFT's default lora_alpha = r: scale 1
            rank = entry["down"].shape[0]
            scale = alpha / (math.sqrt(rank) if config.get(f"{component}.use_rslora") else rank)
            entry["alpha"] = torch.tensor(scale * rank)
    return entries


def _entries(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str, kohya: bool):
    """(entries per file module, the function applying them): plain LoRA through ``apply_lora_tensors``;
    LyCORIS tensors (LoHa, LoKr, DoRA) and PEFT DoRA through ``apply_adapter_tensors``."""
    if not kohya:
        entries = _peft_entries(tensors, metadata, source)
        if not any("dora_scale" in entry for entry in entries.values()):
            return entries, apply_lora_tensors
        names = {
            "down": "lora_down.weight",
            "up": "lora_up.weight",
            "dora_scale": "dora_scale",
            "alpha": "alpha",
        }
        return {n: {names[k]: v for k, v in e.items()} for n, e in entries.items()}, apply_adapter_tensors
    if all(k.partition(".")[2] in _SUFFIXES for k in tensors):
        return _group_entries(tensors, source), apply_lora_tensors
    _check_network(metadata, source)  # a LyCORIS algorithm we do not read: named first
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        entries.setdefault(name, {})[suffix] = value
    return entries, apply_adapter_tensors


def load_sdxl_lora(
    path: str | os.PathLike,
    parts: Mapping[str, nn.Module],
    multiplier: float = 1.0,
    merge: bool = False,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Apply an SDXL LoRA file (either layout, told by its keys) to ``parts`` (``unet``, ``text_encoder``,
    ``text_encoder_2``): inject LoRA layers, or ``merge`` the deltas into the weights (several files stack).
    Everything is checked before any module changes. Returns ``apply_lora_tensors``' summary plus
    ``format``, ``metadata`` and ``text_encoder_2_modules``."""
    metadata = read_safetensors_metadata(path)
    source = str(path)
    tensors = {k: v for k, v in load_safetensors_file(path).items() if not k.startswith(BUNDLE_PREFIX)}
    _refuse_other_family(list(tensors), metadata, source)
    kohya = all(k.startswith(tuple(KOHYA_PREFIX.values())) for k in tensors)
    layout = "kohya" if kohya else "peft"
    entries, apply = _entries(tensors, metadata, source, kohya)
    parts = {k: (find_unet(v) if k == "unet" else v) for k, v in parts.items() if v is not None}
    module_map = sdxl_module_map(parts, layout)

    def component_of(name: str) -> str:
        if not kohya:
            return name.partition(".")[0]
        return next((c for c, prefix in KOHYA_PREFIX.items() if name.startswith(prefix)), "unknown")

    summary = apply(
        entries,
        module_map,
        dict(parts),
        multiplier=multiplier,
        merge=merge,
        strict=strict,
        source=source,
        component_of=component_of,
    )
    summary["text_encoder_2_modules"] = sum(n.startswith("text_encoder_2.") for n in summary["module_names"])
    summary.update(format=layout, metadata=metadata)
    return summary
