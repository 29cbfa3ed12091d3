"""LyCORIS files (LoHa, LoKr, DoRA; what kohya sd-scripts with ``--network_module lycoris.kohya`` writes, and
AUTOMATIC1111, ComfyUI and LyCORIS read): kohya's module names (``lora_unet_*`` / ``lora_te_*``, see
``ldm.io.kohya_lora``) with the LyCORIS tensor names per module:

* LoHa: ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in*kh*kw], ``hada_w2_a``, ``hada_w2_b``, ``alpha``;
* LoKr: ``lokr_w1`` [a, c] or ``lokr_w1_a`` / ``lokr_w1_b``; ``lokr_w2`` [b, d(, kh, kw)] or ``lokr_w2_a``
  [b, r] / ``lokr_w2_b`` [r, d*kh*kw]; ``alpha``;
* DoRA: ``lora_down.weight`` / ``lora_up.weight`` / ``alpha`` as a kohya LoRA, plus ``dora_scale`` ([out,
  1...] on the output axis, [1, in, ...] on the input axis);
* metadata: ``ss_network_module=lycoris.kohya``, ``ss_network_dim`` / ``ss_network_alpha``,
  ``ss_network_args`` (JSON: ``algo`` = ``loha`` / ``lokr`` / ``lora``, ``conv_dim`` / ``conv_alpha``,
  ``factor`` for LoKr, ``dora_wd`` for DoRA), and kohya's ``ss_*`` entries.

Files holding algorithms we do not read (Tucker variants, ``full``, ``glora``, ``ia3``, (B)OFT, norms) raise
one ``ValueError`` naming the algorithm and what we read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.io.adapter_files import apply_adapter_tensors, collect_adapter_layers
from ldm.io.diffusers_names import find_unet
from ldm.io.kohya_lora import (
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    _base_model_version,
    _format_number,
    _most_common,
    _tensor_data_hash,
    kohya_module_map,
    sdxl_hint,
)
from ldm.io.lora_files import metadata_str
from ldm.io.safe_load import load_safetensors_file, read_safetensors_metadata
from ldm.modules.adapters.algorithms import READ, is_conv_kernel
from ldm.utils.files import atomic_save_safetensors

__all__ = ["load_lycoris_lora", "lycoris_metadata", "save_lycoris_lora"]

UNREAD_ALGOS = ("full", "glora", "ia3", "diag-oft", "boft", "oft", "norms", "dylora", "tlora")


def lycoris_metadata(layers: Mapping[str, Any], factor: int | None = None) -> dict[str, str]:
    """kohya / LyCORIS network metadata for ``{file module name: adapter layer}`` (one algorithm)."""
    algos = {layer.algo for layer in layers.values()}
    if len(algos) != 1:
        raise ValueError(f"one adapter algorithm per file, got {sorted(algos)}")
    algo = algos.pop()
    convs = [layer for layer in layers.values() if is_conv_kernel(layer)]
    plain = [layer for layer in layers.values() if not is_conv_kernel(layer)] or convs
    args: dict[str, str] = {"algo": "lora" if algo == "dora" else algo}
    if convs:
        args["conv_dim"] = str(_most_common(layer.rank for layer in convs))
        args["conv_alpha"] = _format_number(_most_common(layer.alpha for layer in convs))
    if algo == "lokr" and factor is not None:
        args["factor"] = str(factor)
    if algo == "dora":
        args["dora_wd"] = "True"
        args["wd_on_out"] = str(
            all(layer.dora_scale.shape[0] == layer.weight.shape[0] for layer in layers.values())
        )
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(_most_common(layer.rank for layer in plain)),
        "ss_network_alpha": str(float(_most_common(layer.alpha for layer in plain))),
        "ss_network_args": json.dumps(args),
    }


def save_lycoris_lora(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    metadata: Mapping[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
    factor: int | None = None,
) -> Path:
    """Write the adapter layers of ``unet`` / ``text_encoder`` (LoHa, LoKr, DoRA, or LoRA) in the LyCORIS
    layout (module docstring); ``metadata`` entries win over the computed ones; ``dtype`` casts the adapter
    tensors (``alpha`` stays 0-d float32). ``factor``: LoKr's, recorded in ``ss_network_args``. Atomic;
    returns the path."""
    path = Path(path)
    layers = collect_adapter_layers(unet, text_encoder, kohya_module_map)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        for suffix, tensor in layer.adapter_tensors().items():
            tensor = tensor.detach() if dtype is None else tensor.detach().to(dtype)
            tensors[f"{name}.{suffix}"] = tensor.cpu().contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    version = _base_model_version(None if unet is None else find_unet(unet), text_encoder)
    defaults = {
        **lycoris_metadata(layers, factor),
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_training_comment": "",
        "ss_output_name": path.stem,
        "ss_network_train_unet_only": str(not any(k.startswith(TEXT_ENCODER_PREFIX) for k in layers)),
        "sshs_model_hash": _tensor_data_hash(tensors),
    }
    merged = {**defaults, **{str(k): metadata_str(v) for k, v in (metadata or {}).items()}}
    atomic_save_safetensors(tensors, path, merged)
    return path


def _check_network(metadata: Mapping[str, str], source: str) -> None:
    """A LyCORIS file whose ``ss_network_args`` names an algorithm we do not read: say so first."""
    try:
        algo = str(json.loads(metadata.get("ss_network_args") or "{}").get("algo", "")).lower()
    except (ValueError, AttributeError):
        return
    if algo in UNREAD_ALGOS:
        raise ValueError(
            f"{source}: LyCORIS algorithm {algo!r} (ss_network_args) is not read; we read {READ}"
        )


def load_lycoris_lora(
    path: str | os.PathLike | Mapping[str, torch.Tensor],
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    multiplier: float = 1.0,
    merge: bool = False,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Apply a LyCORIS (or kohya LoRA) file to ``unet`` / ``text_encoder``: semantics and summary as
    ``ldm.io.kohya_lora.load_kohya_lora``, for every algorithm we read (``summary["algo"]``)."""
    if unet is None and text_encoder is None:
        raise ValueError("pass a unet and/or a text_encoder to load the adapter into")
    unet = None if unet is None else find_unet(unet)
    if isinstance(path, Mapping):
        tensors, metadata, source = dict(path), {}, "adapter state dict"
    else:
        metadata = read_safetensors_metadata(path)
        tensors, source = load_safetensors_file(path), str(path)
    _check_network(metadata, source)
    bad_prefix = [k for k in tensors if not k.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX))]
    if bad_prefix:
        raise KeyError(
            f"{source}: {len(bad_prefix)} keys are not lora_unet_* / lora_te_* keys, e.g. {bad_prefix[:5]}"
            + sdxl_hint(bad_prefix)
        )
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        entries.setdefault(name, {})[suffix] = value
    summary = apply_adapter_tensors(
        entries,
        kohya_module_map(unet, text_encoder, ldm_aliases=True),
        {"unet": unet, "text_encoder": text_encoder},
        multiplier=multiplier,
        merge=merge,
        strict=strict,
        source=source,
        component_of=lambda n: "unet" if n.startswith(UNET_PREFIX) else "text_encoder",
    )
    summary["metadata"] = metadata
    return summary
