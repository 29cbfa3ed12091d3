"""kohya-ss LoRA files: the ``.safetensors`` format AUTOMATIC1111, ComfyUI, kohya sd-scripts and
diffusers (``load_lora_weights``) read.

Layout (one entry per adapted layer; ``<name>`` is the module path with ``.`` replaced by ``_``):

* UNet: ``lora_unet_<diffusers UNet module path>``, e.g.
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` for our
  ``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` (SD v1 config),
  ``lora_unet_mid_block_attentions_0_proj_in``, ``lora_unet_up_blocks_1_attentions_2_proj_out``.
* text encoder: ``lora_te_<transformers CLIP path>``, e.g.
  ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, ``lora_te_text_model_encoder_layers_11_mlp_fc2``.
* tensors per entry: ``<name>.lora_down.weight`` [r, in] (conv: [r, in, kh, kw]),
  ``<name>.lora_up.weight`` [out, r] (conv: [out, r, 1, 1]), ``<name>.alpha`` 0-d float
  (scale = alpha / r; a missing alpha means alpha = r).
* metadata (str -> str): ``ss_network_module=networks.lora``, ``ss_network_dim``,
  ``ss_network_alpha``, ``ss_base_model_version`` (``sd_v1`` / ``sd_v2``), ``ss_v2``,
  ``ss_training_comment``, ``ss_output_name``, ``ss_network_train_unet_only``,
  ``sshs_model_hash`` (sha256 of the tensor data, as sd-webui-additional-networks computes it),
  ``ss_network_args`` (JSON, ``conv_dim``/``conv_alpha`` when 3x3 convs are adapted), plus the
  caller's entries (e.g. ``ss_steps``, ``ss_resolution``), which win over the defaults.

Our UNet keeps the original LDM module names (``input_blocks`` / ``middle_block`` / ``output_blocks``);
``ldm.io.diffusers_names.unet_module_names`` maps them to diffusers module paths for the given UNet's
configuration (levels, ``num_res_blocks``, which levels carry attention), read from the module.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from ldm.io.diffusers_names import find_unet, text_encoder_module_names, unet_module_names
from ldm.io.lora_files import apply_lora_tensors, collect_lora_tensors, metadata_str
from ldm.io.safe_load import load_safetensors_file, read_safetensors_metadata
from ldm.modules.attention import SpatialTransformer
from ldm.utils.files import atomic_save_safetensors

__all__ = ["TEXT_ENCODER_PREFIX", "UNET_PREFIX", "kohya_module_map", "load_kohya_lora", "save_kohya_lora"]

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"


def kohya_module_map(
    unet: nn.Module | None = None, text_encoder: nn.Module | None = None, ldm_aliases: bool = False
) -> dict:
    """``{kohya name: (component, module name)}`` for every adaptable layer; component is
    ``"unet"`` or ``"text_encoder"``; UNet module names are relative to the ``UNetModel``.

    ``ldm_aliases`` also maps the LDM-named variant some tools write
    (``lora_unet_input_blocks_4_1_proj_in``), which A1111 reads too."""
    mapping: dict[str, tuple[str, str]] = {}
    if unet is not None:
        for ours, theirs in unet_module_names(unet).items():
            mapping[UNET_PREFIX + theirs.replace(".", "_")] = ("unet", ours)
            if ldm_aliases:
                mapping.setdefault(UNET_PREFIX + ours.replace(".", "_"), ("unet", ours))
    if text_encoder is not None:
        for ours, theirs in text_encoder_module_names(text_encoder).items():
            mapping[TEXT_ENCODER_PREFIX + theirs.replace(".", "_")] = ("text_encoder", ours)
    return mapping


# ------------------------------------------------------------------------------------------ saving


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _tensor_data_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a safetensors file's bytes after its header (independent of metadata)."""
    blob = save(dict(tensors))
    header = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header :]).hexdigest()


def _base_model_version(unet: nn.Module | None, text_encoder: nn.Module | None) -> str:
    if unet is not None:
        transformers = [m for m in find_unet(unet).modules() if isinstance(m, SpatialTransformer)]
        return "sd_v2" if transformers and transformers[0].use_linear else "sd_v1"
    hidden = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    if hidden is None and hasattr(text_encoder, "hidden_size"):
        hidden = text_encoder.hidden_size
    return "sd_v2" if hidden == 1024 else "sd_v1"


def save_kohya_lora(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the LoRA layers injected into ``unet`` / ``text_encoder`` as a kohya ``.safetensors``.

    ``metadata`` entries (values stringified; dicts/lists as JSON) override the computed ``ss_*``
    defaults (see the module docstring). ``dtype`` casts the up/down weights (e.g. ``torch.float16``);
    alpha is stored as a 0-d float32. The write is atomic. Returns the path.
    """
    path = Path(path)
    entries, layers = collect_lora_tensors(unet, text_encoder, kohya_module_map)

    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up, alpha) in entries.items():
        down, up = down.detach(), up.detach()
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        tensors[f"{name}.lora_down.weight"] = down.cpu().contiguous()
        tensors[f"{name}.lora_up.weight"] = up.cpu().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)

    # kohya: network_dim/alpha for linears and 1x1 convs, conv_dim/conv_alpha for larger kernels.
    convs = [layer for layer in layers if tuple(layer.weight.shape[2:]) not in ((), (1, 1))]
    plain = [layer for layer in layers if tuple(layer.weight.shape[2:]) in ((), (1, 1))]
    rank_layers = plain or convs
    version = _base_model_version(unet, text_encoder)
    defaults: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_most_common(layer.rank for layer in rank_layers)),
        "ss_network_alpha": str(float(_most_common(layer.alpha for layer in rank_layers))),
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_training_comment": "",
        "ss_output_name": path.stem,
        "ss_network_train_unet_only": str(not any(k.startswith(TEXT_ENCODER_PREFIX) for k in entries)),
        "sshs_model_hash": _tensor_data_hash(tensors),
    }
    if convs:
        defaults["ss_network_args"] = json.dumps(
            {
                "conv_dim": str(_most_common(layer.rank for layer in convs)),
                "conv_alpha": _format_number(_most_common(layer.alpha for layer in convs)),
            }
        )
    merged = {**defaults, **{str(k): metadata_str(v) for k, v in (metadata or {}).items()}}
    atomic_save_safetensors(tensors, path, merged)
    return path


# ------------------------------------------------------------------------------------------ loading


_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def _group_entries(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"down", "up", "alpha"}}``; unsupported tensor kinds raise ``ValueError``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unsupported = []
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix not in _SUFFIXES:
            unsupported.append(key)
            continue
        groups.setdefault(name, {})[_SUFFIXES[suffix]] = value
    if unsupported:
        raise ValueError(
            f"{source}: {len(unsupported)} tensors are not plain LoRA (lora_down.weight / lora_up.weight / "
            f"alpha), e.g. {unsupported[:5]}; LyCORIS files (LoHa, LoKr, DoRA) load with "
            "ldm.io.lycoris_lora.load_lycoris_lora (or ldm.io.lora_any.load_lora, which picks the reader)"
        )
    incomplete = [n for n, g in groups.items() if "down" not in g or "up" not in g]
    if incomplete:
        raise ValueError(
            f"{source}: {len(incomplete)} LoRA modules lack lora_down or lora_up, e.g. {incomplete[:5]}"
        )
    return groups


def load_kohya_lora(
    path: str | os.PathLike | Mapping[str, torch.Tensor],
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    multiplier: float = 1.0,
    merge: bool = False,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Apply a kohya LoRA file (or its tensor dict) to ``unet`` / ``text_encoder``.

    ``merge=False``: injects ``LoRALinear`` / ``LoRAConv2d`` layers with rank and alpha from the file
    (per module; missing alpha = rank; fp16/bf16 tensors are cast to the model's dtype) and
    ``multiplier`` as their inference strength; they are trainable (``lora_parameters``) and
    ``remove_lora`` takes them out. ``merge=True``: folds ``multiplier * alpha/r * up @ down`` into
    the weights in place (no module changes), so several files stack with their own multipliers.
    ``strict`` (default): a module name that maps to no module of the given model(s), or a component
    that was not passed, raises ``KeyError`` naming the first keys; non-LoRA tensors (LyCORIS, DoRA)
    raise ``ValueError``. Returns a summary: ``modules`` (count), ``unet_modules``,
    ``text_encoder_modules``, ``rank`` / ``alpha`` (a value, or the sorted distinct values),
    ``module_names``, ``skipped``, ``metadata``, ``multiplier``, ``merged``.
    """
    if unet is None and text_encoder is None:
        raise ValueError("pass a unet and/or a text_encoder to load the LoRA into")
    unet = None if unet is None else find_unet(unet)
    if isinstance(path, Mapping):
        tensors, metadata, source = dict(path), {}, "LoRA state dict"
    else:
        metadata = read_safetensors_metadata(path)  # first: names a damaged file
        tensors, source = load_safetensors_file(path), str(path)
    bad_prefix = [k for k in tensors if not k.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX))]
    if bad_prefix:
        raise KeyError(
            f"{source}: {len(bad_prefix)} keys are not kohya LoRA keys (lora_unet_* / lora_te_*) of an SD "
            f"1.x/2.x base, e.g. {bad_prefix[:5]}{sdxl_hint(bad_prefix)}"
        )
    entries = _group_entries(tensors, source)
    summary = apply_lora_tensors(
        entries,
        kohya_module_map(unet, text_encoder, ldm_aliases=True),
        {"unet": unet, "text_encoder": text_encoder},
        multiplier=multiplier,
        merge=merge,
        strict=strict,
        source=source,
        component_of=_kohya_component,
    )
    summary["metadata"] = metadata
    return summary


def sdxl_hint(keys) -> str:
    """For keys an SD 1.x/2.x reader refused: where an SDXL file (``lora_te1_`` / ``lora_te2_``) is read."""
    if not any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return ""
    return (
        "; lora_te1_/lora_te2_ keys are an SDXL LoRA: load it into an SDXL base with "
        "ldm.io.sdxl_lora.load_sdxl_lora, or ldm.io.lora_any.load_lora(..., text_encoders=[te1, te2])"
    )


def _kohya_component(name: str) -> str:
    return "unet" if name.startswith(UNET_PREFIX) else "text_encoder"
