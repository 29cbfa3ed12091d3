"""kohya's LoRA tools: resize a LoRA file to a lower rank, and extract a LoRA from a full fine-tune (a
DreamBooth run vs its base), both by truncated SVD (``ldm.modules.adapters.lora_svd``), at a fixed rank or
at the rank that keeps a given fraction of each delta's squared Frobenius norm ("energy"). Both write kohya
files (``alpha`` = rank, scale 1) and report how much of the difference each module keeps."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.io.diffusers_names import find_unet
from ldm.io.kohya_lora import _tensor_data_hash, kohya_module_map
from ldm.io.safe_load import load_safetensors_file, read_safetensors_metadata
from ldm.modules.adapters.lora import match_targets
from ldm.modules.adapters.lora_svd import low_rank_factors, singular_values
from ldm.utils.files import atomic_save_safetensors

__all__ = ["RANK_CURVE", "extract_lora", "resize_lora_file"]

RANK_CURVE = (1, 2, 4, 8, 16, 32, 64, 128)
_LORA_SUFFIXES = {"lora_down.weight", "lora_up.weight", "alpha"}


def _lora_deltas(
    tensors: Mapping[str, torch.Tensor], source: str
) -> dict[str, tuple[torch.Tensor, torch.dtype]]:
    """``{module: (alpha/r * up @ down in the weight's shape, the file's dtype)}`` of a plain kohya LoRA."""
    other = sorted({k.partition(".")[2] for k in tensors} - _LORA_SUFFIXES)
    if other:
        raise ValueError(
            f"{source}: resize reads plain kohya LoRA / LoCon files (lora_down / lora_up / alpha), this "
            f"one has {other[:4]} (LyCORIS LoHa / LoKr / DoRA files are not resized)"
        )
    names = sorted({k.partition(".")[0] for k in tensors})
    deltas = {}
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
        delta = (alpha / rank) * (up.float().flatten(1) @ down.float().flatten(1))
        shape = (up.shape[0], *down.shape[1:]) if down.ndim == 4 else (up.shape[0], down.shape[1])
        deltas[name] = (delta.reshape(shape), down.dtype)
    return deltas


def _network_metadata(ranks: Mapping[str, int], shapes: Mapping[str, torch.Size]) -> dict[str, str]:
    conv_names = {n for n in ranks if len(shapes[n]) == 4 and tuple(shapes[n][2:]) != (1, 1)}
    convs = [ranks[n] for n in ranks if n in conv_names]
    plain = [ranks[n] for n in ranks if n not in conv_names]
    common = Counter(plain or convs).most_common(1)[0][0]
    meta = {"ss_network_dim": str(common), "ss_network_alpha": str(float(common))}
    if convs:
        conv = Counter(convs).most_common(1)[0][0]
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv), "conv_alpha": str(conv)})
    return meta


def _write(path: Path, factors: dict, metadata: Mapping[str, str]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, (low, dtype) in factors.items():
        tensors[f"{name}.lora_down.weight"] = low.down.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = low.up.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(low.rank), dtype=torch.float32)
    atomic_save_safetensors(tensors, path, {**metadata, "sshs_model_hash": _tensor_data_hash(tensors)})


def _report(factors: dict, totals: Mapping[str, float], values: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    total = sum(totals.values())
    kept = sum(low.kept * totals[n] for n, (low, _) in factors.items())
    curve = {}
    for rank in RANK_CURVE:
        kept_at = sum(float((v[: min(rank, len(v))].double() ** 2).sum()) for v in values.values())
        curve[rank] = kept_at / total if total > 0 else 1.0
    return {
        "modules": len(factors),
        "ranks": {n: low.rank for n, (low, _) in factors.items()},
        "kept": {n: low.kept for n, (low, _) in factors.items()},
        "total_kept": kept / total if total > 0 else 1.0,
        "kept_at_rank": curve,
    }


def resize_lora_file(
    source: str | os.PathLike, out: str | os.PathLike, rank: int | None = None, energy: float | None = None
) -> dict[str, Any]:
    """Write ``source`` (a kohya LoRA / LoCon file) at ``rank`` or at the ``energy`` to keep, per module, to
    ``out``; its other metadata is kept. Returns the report: per module rank and kept fraction, ``total_kept``
    (of the file's whole ``sum ||delta||_F^2``) and ``kept_at_rank`` (what each rank of ``RANK_CURVE``
    keeps)."""
    metadata = read_safetensors_metadata(source)
    deltas = _lora_deltas(load_safetensors_file(source), str(source))
    factors, totals, values = {}, {}, {}
    for name, (delta, dtype) in deltas.items():
        factors[name] = (low_rank_factors(delta, rank, energy), dtype)
        values[name] = singular_values(delta)
        totals[name] = float((values[name].double() ** 2).sum())
    ranks = {n: low.rank for n, (low, _) in factors.items()}
    how = f"rank {rank}" if energy is None else f"energy {energy}" + (f", rank <= {rank}" if rank else "")
    comment = (metadata.get("ss_training_comment", "") + f"; resized by SVD ({how})").lstrip("; ")
    new_meta = {**metadata, **_network_metadata(ranks, {n: d.shape for n, (d, _) in deltas.items()})}
    new_meta["ss_training_comment"] = comment
    _write(Path(out), factors, new_meta)
    return _report(factors, totals, values)


def _weight_deltas(base: nn.Module, tuned: nn.Module, targets: Iterable[str], what: str):
    """``{module name: tuned.weight - base.weight}`` for the targeted layers whose weights differ."""
    deltas = {}
    for name in match_targets(base, list(targets)):
        weight, other = base.get_submodule(name).weight, tuned.get_submodule(name).weight
        if weight.shape != other.shape:
            raise ValueError(
                f"{what} {name}: the tuned weight {tuple(other.shape)} is not the base's "
                f"{tuple(weight.shape)}"
            )
        delta = other.detach().float() - weight.detach().float()
        if bool(delta.abs().max() > 0):
            deltas[name] = delta
    return deltas


def extract_lora(
    out: str | os.PathLike,
    base: Mapping[str, nn.Module],
    tuned: Mapping[str, nn.Module],
    targets: Mapping[str, Iterable[str]],
    rank: int | None = None,
    energy: float | None = None,
    conv_rank: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write the LoRA that best approximates ``tuned - base`` (each ``{"unet", "text_encoder"}`` -> module)
    on the layers ``targets`` names per component (globs / presets' patterns); 3x3 convolutions take
    ``conv_rank`` when given. Layers whose weights did not change are left out. Returns
    ``resize_lora_file``'s report."""
    unet = find_unet(base["unet"]) if base.get("unet") is not None else None
    names = {v: k for k, v in kohya_module_map(unet, base.get("text_encoder")).items()}
    factors, totals, values = {}, {}, {}
    for component, patterns in targets.items():
        if base.get(component) is None or not patterns:
            continue
        model, other = base[component], tuned[component]
        if component == "unet":
            model, other = find_unet(model), find_unet(other)
        for name, delta in _weight_deltas(model, other, patterns, component).items():
            is_conv = delta.ndim == 4 and tuple(delta.shape[2:]) != (1, 1)
            r = conv_rank if is_conv and conv_rank else rank
            key = names[(component, name)]
            values[key] = singular_values(delta)
            factors[key] = (low_rank_factors(delta, r, energy), torch.float32)
            totals[key] = float((values[key].double() ** 2).sum())
    if not factors:
        raise ValueError("the tuned model's targeted weights equal the base's: nothing to extract")
    shapes = {n: low.down.shape for n, (low, _) in factors.items()}
    meta = {
        "ss_network_module": "networks.lora",
        "ss_training_comment": "extracted by SVD of (tuned - base) with ldm-lightning",
        **_network_metadata({n: low.rank for n, (low, _) in factors.items()}, shapes),
        **dict(metadata or {}),
    }
    _write(Path(out), factors, meta)
    return _report(factors, totals, values)
