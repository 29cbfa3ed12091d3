"""DoRA in the diffusers / PEFT layout (``LoraConfig(use_dora=True)``; what ``save_lora_weights`` writes and
``load_lora_weights`` / ``set_peft_model_state_dict`` read): ``ldm.io.peft_lora``'s ``lora_A`` / ``lora_B``
keys (``alpha / rank`` folded into ``lora_B``) plus ``<module>.lora_magnitude_vector`` [out], the magnitude
per output row. ``load_peft_lora`` reads these files."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.io.adapter_files import collect_adapter_layers
from ldm.io.lora_files import metadata_str
from ldm.io.peft_lora import peft_module_map
from ldm.utils.files import atomic_save_safetensors

__all__ = ["save_peft_dora"]


def save_peft_dora(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the DoRA layers of ``unet`` / ``text_encoder`` in the PEFT layout (module docstring). Only the
    output-axis magnitude exists in PEFT: an input-axis layer raises. Atomic; returns the path."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in collect_adapter_layers(unet, text_encoder, peft_module_map).items():
        if layer.algo != "dora" or layer.dora_scale.numel() != layer.weight.shape[0]:
            raise ValueError(
                f"{name}: the PEFT DoRA layout holds output-axis DoRA layers only, got {layer!r}"
            )
        out_dtype = dtype or layer.lora_down.weight.dtype
        up = layer.lora_up.weight.detach().float() * layer.scale
        magnitude = layer.dora_scale.reshape(-1)
        parts = {
            "lora_A.weight": layer.lora_down.weight,
            "lora_B.weight": up,
            "lora_magnitude_vector": magnitude,
        }
        for suffix, tensor in parts.items():
            tensors[f"{name}.{suffix}"] = tensor.detach().to(out_dtype).cpu().contiguous()
    info = {"format": "pt", **{str(k): metadata_str(v) for k, v in (metadata or {}).items()}}
    atomic_save_safetensors(tensors, path, info)
    return path
